"""Data preparation end to end: source videos and images → clips, captions, hints, face set, manifests.

Per source video, in ``OUT/sources/<id>/`` (``<clip>`` = ``<start>-<end>``, its frame range in the source):

=================================  ==================================================================
``scenes.json``                    detected scenes and the detection settings (changed settings detect again)
``encoding.json``                  clip size and quality; changed, every clip of the video is made again
``<clip>.mp4``                     the clip, H.264, scaled to ``short_side``, at the source frame rate
``<clip>.keyframe.png``            its centre frame: what is captioned and searched for a face
``<clip>.captions.json``           caption cache (:mod:`.captions`)
``<clip>.pose.json``               DWPose ``POSE_KEYPOINT``, one dict per frame (:mod:`.hints`)
``<clip>.depth.safetensors``       ZoeDepth depth ``(F, H, W)`` float16
``<clip>.face.json`` …             face outcome, crop, ArcFace embedding, cloth crop (:mod:`.faces`)
``clips.jsonl``, ``faces.jsonl``   the source's manifest rows
=================================  ==================================================================

Per source image: ``image.png`` (upright, scaled to ``short_side``) with its caption cache and face files. Images
and clip keyframes both enter the face set: the keyframes give in-domain dancers with their clip's caption, the
images add identities the videos lack.

Every step is skipped when its files exist, so a re-run only does what is missing and loads no model when nothing
is. A source that cannot be read is reported by name (and in its ``failed.txt``) and the batch goes on; a broken
model stops it, since every other source would fail the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import torch

from ..errors import DreaMovingError, InputMismatchError, ModelFormatError
from .captions import DEFAULT_PROMPT, Captioner, cached_caption, store_caption
from .faces import FaceFiles, analyse_face
from .hints import extract_hints
from .manifest import ClipRecord, FaceRecord
from .models import NEEDS, OPTIONS, STEPS, ModelPaths
from .scenes import ClipBounds, SceneConfig, clip_ranges, detect_scenes
from .store import Store, beside, write_text
from .video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ClipJob, cut_clips, output_size, probe, read_image, write_image

log = logging.getLogger("dreamoving.data")

CLIP_NAME = re.compile(r"^(\d{7})-(\d{7})\.")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything a preparation run needs besides its sources (the CLI's options)."""

    out: Path
    models: ModelPaths = ModelPaths()
    scenes: SceneConfig = SceneConfig()
    bounds: ClipBounds = ClipBounds()
    short_side: int = 512  # clips and images are scaled down to this shorter side (0: kept)
    crf: int = 18
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 77
    caption_batch: int = 8
    depth_batch: int = 4
    min_face_size: int = 64
    skip: frozenset[str] = frozenset()
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # captioner dtype: auto (bfloat16 on CUDA, else float32) | float32 | float16 | bfloat16
    workers: int = 1
    shard: tuple[int, int] = (0, 1)

    def wants(self, step: str) -> bool:
        return step not in self.skip and (step != "cloth" or "faces" not in self.skip)

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(s for s in STEPS if self.wants(s))


# --- sources and shards -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A video or image to prepare: ``path``, and ``key`` (``<folder name>/<path inside it>`` for a file found in a
    source folder, its name for a file given directly) which with its size makes its ``id``: the same on every
    machine given the same source folder, wherever it is mounted."""

    path: Path
    key: str
    kind: str  # "video" | "image"

    @cached_property
    def id(self) -> str:
        digest = hashlib.sha1(f"{self.key}\0{self.path.stat().st_size}".encode()).hexdigest()[:10]
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(self.key).stem).strip("_")[:40] or "source"
        return f"{slug}-{digest}"

    def in_shard(self, shard: tuple[int, int]) -> bool:
        """Whether shard ``i`` of ``n`` owns this source (by its id's hash: no listing order involved)."""
        index, count = shard
        return int(self.id.rsplit("-", 1)[1], 16) % count == index


def find_sources(inputs: list[str | Path], out: Path) -> list[Source]:
    """Videos and images in ``inputs`` (folders searched recursively, ``out`` and hidden files left out), sorted by
    id. A file given by name is taken as an image when its suffix says so, else as a video."""
    found: dict[Path, Source] = {}
    out = out.resolve()
    for given in map(Path, inputs):
        if given.is_dir():
            root = given.resolve().name
            paths = [p for p in sorted(given.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES
                     and p.is_file() and not p.name.startswith(".") and out not in p.resolve().parents]
            keys = [f"{root}/{p.relative_to(given).as_posix()}" for p in paths]
        elif given.is_file():
            paths, keys = [given], [given.name]
        else:
            raise InputMismatchError(f"source '{given}' does not exist")
        for path, key in zip(paths, keys):
            kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
            found.setdefault(path.resolve(), Source(path, key, kind))
    by_id: dict[str, Source] = {}
    for source in found.values():
        other = by_id.setdefault(source.id, source)
        if other is not source:
            raise InputMismatchError(f"'{other.path}' and '{source.path}' have the same name within their source "
                                     "folders and the same size; give only one of them")
    return sorted(by_id.values(), key=lambda s: s.id)


# --- models of one process ----------------------------------------------------------------------------------------

class Models:
    """The models one process uses, each made on first use; ``loaded`` names those made so far."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        cuda = config.device != "cpu" and torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        self.onnx_device = config.device if cuda else "cpu"  # no GPU for torch: none for onnxruntime either
        self.loaded: list[str] = []

    def _note(self, name: str) -> None:
        self.loaded.append(name)
        log.info("loading %s", name)

    @cached_property
    def captioner(self) -> Captioner:
        """The captioner (its cache key needs no loading; the weights load on its first caption)."""
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        dtype = dtypes.get(self.config.dtype, torch.bfloat16 if self.device == "cuda" else torch.float32)
        return Captioner(self.config.models.captioner, self.config.prompt, self.config.max_new_tokens, self.device,
                         dtype)

    def caption(self, images) -> list[str]:
        if not self.captioner.loaded:
            self._note("captioner")
        return self.captioner.caption(images)

    @cached_property
    def dwpose(self):
        from ..preprocess.dwpose import DWPose

        self._note("dwpose")
        return DWPose(self.config.models.dwpose_detector, self.config.models.dwpose_estimator, self.onnx_device)

    @cached_property
    def zoedepth(self):
        from ..preprocess.zoedepth import load_zoedepth

        self._note("zoedepth")
        return load_zoedepth(self.config.models.zoedepth, self.device)

    @cached_property
    def faces(self):
        from ..guider.face_id import FaceAnalyzer

        self._note("insightface")
        return FaceAnalyzer(self.config.models.insightface, self.onnx_device)


# --- one source ---------------------------------------------------------------------------------------------------

@dataclass
class SourceReport:
    """What preparing one source did: ``work`` counts steps actually run, ``error`` says why it failed."""

    name: str
    id: str
    clips: int = 0
    faces: int = 0
    work: Counter = field(default_factory=Counter)
    loaded: list[str] = field(default_factory=list)
    error: str | None = None


class _SourceJob:
    def __init__(self, source: Source, config: PrepareConfig, models: Models, store: Store, progress: bool):
        self.source, self.config, self.models, self.store = source, config, models, store
        self.folder = store.source_dir(source.id)
        self.report = SourceReport(source.path.name, source.id)
        self.progress = progress

    def captions(self, stems: list[Path], images) -> list[str]:
        """Captions of the images at ``stems`` (``images(stem)`` reads one), from the cache or made in batches."""
        if not self.config.wants("captions"):
            return [""] * len(stems)
        key = self.models.captioner.key
        captions = {s: cached_caption(s, key) for s in stems}
        todo = [s for s in stems if captions[s] is None]
        for i in range(0, len(todo), self.config.caption_batch):
            batch = todo[i:i + self.config.caption_batch]
            for stem, text in zip(batch, self.models.caption([images(s) for s in batch])):
                store_caption(stem, key, text)
                captions[stem] = text
            self.report.work["captions"] += len(batch)
        return [captions[s] for s in stems]

    def face(self, stem: Path, image_path: Path) -> dict | None:
        """The face outcome of the image at ``image_path`` (analysed once, see :mod:`.faces`); ``None`` when the
        face set is skipped."""
        if not self.config.wants("faces"):
            return None
        outcome = FaceFiles.of(stem).outcome_or_none()
        cloth = self.config.wants("cloth")
        if outcome is None or (cloth and outcome["found"] and outcome["cloth"] is None):
            outcome = analyse_face(stem, read_image(image_path), f"'{self.store.relative(image_path)}'",
                                   self.models.faces, self.models.dwpose if cloth else None,
                                   self.config.min_face_size)
            self.report.work["faces"] += 1
        return outcome

    def face_row(self, stem: Path, image_path: Path, outcome: dict, caption: str) -> FaceRecord:
        files, rel = FaceFiles.of(stem), self.store.relative
        cloth = rel(files.cloth) if self.config.wants("cloth") and outcome["cloth"] else None
        return FaceRecord(rel(image_path), rel(files.face), rel(files.arcface), cloth, caption)

    # videos

    def scenes(self) -> dict:
        path = self.folder / "scenes.json"
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if cached is not None and cached["settings"] == self.config.scenes.key():
            return cached
        info, scenes = detect_scenes(self.source.path, self.config.scenes)
        self.report.work["scenes"] += 1
        result = {"settings": self.config.scenes.key(), "rate": str(info.rate), "frames": info.frames,
                  "width": info.width, "height": info.height, "scenes": [list(s) for s in scenes]}
        write_text(path, json.dumps(result) + "\n")
        return result

    def check_encoding(self) -> None:
        """A source prepared with another clip or image size or quality is made again (its scenes are kept)."""
        encoding = {"short_side": self.config.short_side, "crf": self.config.crf}
        path = self.folder / "encoding.json"
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != encoding:
            for file in self.folder.iterdir():
                if file.name != "scenes.json":
                    file.unlink()
        write_text(path, json.dumps(encoding) + "\n")

    def video(self) -> tuple[list[ClipRecord], list[FaceRecord]]:
        scenes = self.scenes()
        self.check_encoding()
        rate = Fraction(scenes["rate"])
        ranges = clip_ranges([tuple(s) for s in scenes["scenes"]], rate, self.config.bounds)
        stems = [self.folder / f"{start:07d}-{end:07d}" for start, end in ranges]
        for file in self.folder.iterdir():  # files of clips other clip bounds made
            if CLIP_NAME.match(file.name) and file.name.split(".", 1)[0] not in {s.name for s in stems}:
                file.unlink()
        jobs = [ClipJob(s, e, beside(stem, ".mp4"), beside(stem, ".keyframe.png"))
                for (s, e), stem in zip(ranges, stems)]
        missing = [j for j in jobs if not (j.clip.is_file() and j.keyframe.is_file())]
        if missing:
            cut_clips(self.source.path, missing, rate, self.config.short_side, self.config.crf)
            self.report.work["clips"] += len(missing)
        captions = self.captions(stems, lambda stem: read_image(beside(stem, ".keyframe.png")))
        clips, faces = [], []
        for (start, end), stem, job, caption in zip(ranges, stems, jobs, captions):
            pose = beside(stem, ".pose.json") if self.config.wants("pose") else None
            depth = beside(stem, ".depth.safetensors") if self.config.wants("depth") else None
            self.hints(job.clip, pose, depth)
            info = probe(job.clip)
            rel = self.store.relative
            clips.append(ClipRecord(rel(job.clip), str(self.source.path.resolve()), float(start / rate),
                                    float(end / rate), float(info.rate), info.frames, info.width, info.height,
                                    caption, rel(pose) if pose else None, rel(depth) if depth else None))
            outcome = self.face(stem, job.keyframe)
            if outcome and outcome["found"]:
                faces.append(self.face_row(stem, job.keyframe, outcome, caption))
        return clips, faces

    def hints(self, clip: Path, pose: Path | None, depth: Path | None) -> None:
        pose = pose if pose is not None and not pose.is_file() else None
        depth = depth if depth is not None and not depth.is_file() else None
        if pose is None and depth is None:
            return
        from tqdm.auto import tqdm

        total = probe(clip).frames
        with tqdm(total=total, desc=clip.name, unit="frame", leave=False,
                  disable=None if self.progress else True) as bar:
            extract_hints(clip, pose, depth, self.models.dwpose if pose else None,
                          self.models.zoedepth if depth else None, self.config.depth_batch,
                          lambda done: bar.update(done - bar.n))
        self.report.work.update(k for k, p in (("pose", pose), ("depth", depth)) if p is not None)

    # images

    def image(self) -> list[FaceRecord]:
        if not self.config.wants("faces"):
            return []  # images are only there for the face set
        self.check_encoding()
        stem = self.folder / "image"
        path = beside(stem, ".png")
        if not path.is_file():
            import cv2

            image = read_image(self.source.path)
            width, height = output_size(image.shape[1], image.shape[0], self.config.short_side)
            if (width, height) != (image.shape[1], image.shape[0]):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            write_image(path, image)
            self.report.work["images"] += 1
        outcome = self.face(stem, path)
        if not outcome["found"]:
            return []
        return [self.face_row(stem, path, outcome, self.captions([stem], lambda s: read_image(path))[0])]

    def run(self) -> SourceReport:
        before = len(self.models.loaded)
        try:
            if self.source.kind == "video":
                clips, faces = self.video()
            else:
                clips, faces = None, self.image()
            self.store.write_rows(self.source.id, clips, faces)
            self.report.clips, self.report.faces = len(clips or []), len(faces)
        except ModelFormatError:
            raise  # a broken model breaks every source: stop
        except Exception as err:  # anything else is this source's problem: report it and go on with the batch
            message = str(err) if isinstance(err, DreaMovingError) else f"{type(err).__name__}: {err}"
            self.report.error = message
            self.store.write_failure(self.source.id, f"{self.source.path}\n{message}\n\n{traceback.format_exc()}")
            log.error("skipped %s: %s", self.source.path.name, message)
        self.report.loaded = self.models.loaded[before:]
        return self.report


# --- the run ------------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    """The outcome of :func:`prepare`: sources in this shard, rows now in the manifests, the work this run did,
    the models it loaded, the sources it skipped (name → reason) and how many other sources in ``out`` are marked
    failed."""

    sources: int
    clips: int
    faces: int
    work: Counter
    loaded: list[str]
    skipped: dict[str, str]
    failed_elsewhere: int
    seconds: float

    def text(self, out: Path) -> str:
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        work = ", ".join(f"{k} {v}" for k, v in sorted(self.work.items())) or "none (everything was done already)"
        lines = [f"prepared {count(self.sources, 'source')} in {self.seconds:.1f} s",
                 f"work done: {work}",
                 f"models loaded: {', '.join(sorted(set(self.loaded))) or 'none'}",
                 f"manifests: {out / 'clips.jsonl'} ({self.clips} clips), {out / 'faces.jsonl'} ({self.faces} faces)"]
        if self.skipped:
            lines.append(f"skipped {count(len(self.skipped), 'unreadable source')}:")
            lines += [f"  {name}: {why}" for name, why in sorted(self.skipped.items())]
        if self.failed_elsewhere:
            lines.append(f"{count(self.failed_elsewhere, 'more source')} of other shards or runs failed "
                         f"(see {out}/sources/<id>/failed.txt)")
        return "\n".join(lines)


def setup_logging(level: int) -> None:
    """Log to stderr at ``level``; below INFO, the libraries' chatter (FFmpeg's, PySceneDetect's, transformers'
    loading bars) is silenced too."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.INFO:
        import av
        import scenedetect  # noqa: F401  (its import sets its logger to INFO)

        av.logging.set_level(av.logging.ERROR)  # x264's statistics, the demuxers' complaints about broken files
        logging.getLogger("pyscenedetect").setLevel(level)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported


_worker: dict = {}


def _init_worker(config: PrepareConfig, counter, gpus: list[str], level: int) -> None:
    """A worker process: its GPU (one of ``gpus`` per worker, in turn), its share of the CPU threads, its models."""
    setup_logging(level)
    with counter.get_lock():
        slot, counter.value = counter.value, counter.value + 1
    if len(gpus) > 1:  # before anything in this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    _worker.update(models=Models(config), store=Store(config.out), config=config)


def _work(source: Source) -> SourceReport:
    return _SourceJob(source, _worker["config"], _worker["models"], _worker["store"], progress=False).run()


def prepare(inputs: list[str | Path], config: PrepareConfig) -> Summary:
    """Prepare this shard's share of the sources in ``inputs`` into ``config.out`` and rebuild the manifests."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    missing = sorted({kind for step in config.steps for kind in NEEDS[step] if getattr(config.models, kind) is None})
    if missing:
        raise InputMismatchError(f"data preparation needs {', '.join(OPTIONS[k] for k in missing)} for the steps "
                                 f"{', '.join(config.steps)} (see models.resolve_models); nothing was done")
    start = time.perf_counter()
    store = Store(Path(config.out))
    sources = [s for s in find_sources(inputs, store.root) if s.in_shard(config.shard)]
    reports: list[SourceReport] = []
    with logging_redirect_tqdm(), tqdm(total=len(sources), desc="sources", unit="source",
                                              disable=None) as bar:
        if config.workers <= 1 or len(sources) <= 1:
            models = Models(config)
            for source in sources:
                reports.append(_SourceJob(source, config, models, store, progress=True).run())
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")  # CUDA and onnxruntime do not survive a fork
            counter = context.Value("i", 0)
            count = torch.cuda.device_count() if config.device != "cpu" else 0  # this process never uses CUDA
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
            level = logging.getLogger().getEffectiveLevel()
            with context.Pool(config.workers, _init_worker, (config, counter, gpus, level)) as pool:
                for report in pool.imap_unordered(_work, sources):
                    reports.append(report)
                    bar.update()
                pool.close()  # let the workers exit on their own: a terminated one leaks its semaphores
                pool.join()
    clips, faces, failed = store.rebuild_manifests()
    skipped = [r for r in reports if r.error]
    return Summary(len(sources), clips, faces, sum((r.work for r in reports), Counter()),
                   [m for r in reports for m in r.loaded], {r.name: r.error for r in skipped},
                   len(set(failed) - {r.id for r in skipped}), time.perf_counter() - start)

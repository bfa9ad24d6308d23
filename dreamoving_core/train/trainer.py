"""The training loop every stage shares, on accelerate.

One :func:`train` call: check the config, data and model files (before any model reaches a GPU), load the frozen
SD1.5 base and the stage's modules, then take ``steps`` optimizer steps of the ε-prediction loss

    L = ‖ε − ε_θ(√ᾱ_t·z₀ + √(1−ᾱ_t)·ε, t, c)‖²

with one timestep per video (all its frames share it). Mixed precision, gradient accumulation, DDP / DeepSpeed come
from accelerate; the full training state is saved every ``checkpoint_every`` steps (``save_state``, plus our EMA and
step counter as safetensors / JSON, so resuming unpickles nothing but accelerate's own optimizer and RNG files,
read with ``weights_only``) and the stage's result is exported in our formats beside it. Noise, timesteps, dropped
conditions and data order are drawn from seeds of (run seed, step, process), so a resumed run repeats the losses of
an uninterrupted one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ..guider.model import ImageFeatures
from ..io import load_state_dict, save_state_dict
from .base import SD15_COMPONENTS, check_sd15, checkpoint_shapes, file_sha256, load_base, read_checkpoint, \
    unet_config
from .config import ConfigError, TrainConfig
from .data import ClipDataset, FaceDataset, StepSampler, check_clips, check_faces, image_tensor, sample_seed
from .stages import SPECS, Stage, build_stage, export, load_parts
from .validate import Scorer, crop_poses, load_scorer, sample_frames, write_frames

log = logging.getLogger(__name__)
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainResult:
    """``output``: the exported file (on the main process); ``losses``: this process's loss at each step run;
    ``weights_sha256``: digest of the trained weights, equal on every process."""

    output: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    world_size: int = 1
    weights_sha256: str = ""


class TextEncoder:
    """Frozen CLIP-L text embeddings ``(N, 77, 768)`` of captions; the most recent ``cache_size`` are kept (the
    encoder is frozen, so a cached embedding is the one it would compute)."""

    def __init__(self, tokenizer, model: torch.nn.Module, cache_size: int = 512):
        self.tokenizer, self.model, self.cache_size = tokenizer, model, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        fresh = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if fresh:
            device = next(self.model.parameters()).device
            ids = self.tokenizer(fresh, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            for caption, embedding in zip(fresh, self.model(ids)[0]):
                self._cache[caption] = embedding
        for caption in captions:
            self._cache.move_to_end(caption)
        embeddings = torch.stack([self._cache[c] for c in captions])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(random.Random(":".join(map(str, (seed, *parts)))).getrandbits(63))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, bytes), to compare weights across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


class Trainer:
    """One run of one stage. Build with the config (all checks and loading happen here), then :meth:`run`."""

    def __init__(self, config: TrainConfig, scorer: Scorer | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config, self.spec = config, SPECS[config.stage]
        self.output_dir = Path(config.output_dir)
        on_cpu = config.cpu or not torch.cuda.is_available()
        if on_cpu and config.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 needs a CUDA device; use bf16 or no on the CPU")
        if config.optimizer.adam_8bit and on_cpu:
            raise ConfigError("optimizer.adam_8bit (bitsandbytes' 8-bit AdamW) needs a CUDA device")
        self.scorer = scorer or (load_scorer(config.validation.scorer) if config.validation.scorer else None)
        self.dataset, self.validation_set = self._check_data()
        shapes = checkpoint_shapes(_exists(config.models.checkpoint, "models.checkpoint",
                                           "the SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors)"))
        if shapes is not None:
            check_sd15(shapes, Path(config.models.checkpoint).name)
        components = config.models.components or SD15_COMPONENTS
        parts = load_parts(config, unet_config(components))
        self._optimizer_class()  # a missing bitsandbytes is reported before the base model is read

        self.accelerator = Accelerator(
            cpu=config.cpu, mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[config.mixed_precision]
        sd = read_checkpoint(config.models.checkpoint)
        base = load_base(sd, Path(config.models.checkpoint).name, components)
        del sd
        self.stage: Stage = build_stage(config, base, parts)
        for note in self.stage.notes:
            log.warning(note)
        for module in self.stage.frozen.values():
            module.to(self.device, self.weight_dtype)
        self.text = TextEncoder(base.tokenizer, base.text_encoder)
        self.vae = base.vae
        self.blank = self._blank_features()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                             beta_schedule=config.noise_schedule)
        self.metadata = self._metadata() if self.accelerator.is_main_process else {}

    # ------------------------------------------------------------------------------------------------ set-up

    def _check_data(self):
        data, spec = self.config.data, self.spec
        if spec.data == "faces":
            dataset = FaceDataset(*check_faces(data.root, data.manifest), data.resolution)
            return dataset, dataset
        hint = data.hint if self.config.stage in ("video_controlnet", "expression") else None
        folder, records = check_clips(data.root, data.manifest, data.frames, data.frame_stride, hint)
        frames = self.config.validation.frames or data.frames
        if frames != data.frames:
            check_clips(data.root, data.manifest, frames, data.frame_stride, hint)
        return (ClipDataset(folder, records, data.frames, data.frame_stride, data.resolution, hint),
                ClipDataset(folder, records, frames, data.frame_stride, data.resolution, hint))

    def _optimizer_class(self):
        if not self.config.optimizer.adam_8bit:
            return torch.optim.AdamW
        try:
            import bitsandbytes
        except ImportError as err:
            raise ConfigError("optimizer.adam_8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bitsandbytes.optim.AdamW8bit

    def _blank_features(self) -> ImageFeatures | None:
        """What a dropped or absent image shows the guider: as the nodes' unconditional half (zero CLIP embeds, a
        black image's hidden states, a zero ArcFace embedding)."""
        if self.stage.clip is None:
            return None
        blank = self.stage.clip.encode(torch.zeros(1, 224, 224, 3))
        return ImageFeatures(torch.zeros_like(blank.image_embeds), blank.penultimate_hidden_states,
                             torch.zeros(1, 512, device=blank.penultimate_hidden_states.device))

    def _metadata(self) -> dict[str, str]:
        config = self.config
        manifest = Path(self.dataset.folder) / ("faces.jsonl" if self.spec.data == "faces" else "clips.jsonl") \
            if config.data.manifest is None else Path(config.data.manifest)
        return {"stage": config.stage, "learning_rate": repr(config.optimizer.lr),
                "noise_schedule": config.noise_schedule, "resolution": str(config.data.resolution),
                "frames": str(config.data.frames), "data_manifest": str(manifest),
                "data_manifest_sha256": file_sha256(manifest),
                "base_checkpoint": Path(config.models.checkpoint).name,
                "base_checkpoint_sha256": file_sha256(config.models.checkpoint),
                "training_config": json.dumps(config.to_dict())}

    # --------------------------------------------------------------------------------------------- one step

    def _features(self, batch: dict, drop_image: torch.Tensor) -> dict[str, ImageFeatures]:
        """Per guider slot, CLIP (+ ArcFace) features of the batch, the blank ones where dropped or absent."""
        out = {}
        for slot, source in self.stage.denoiser.guider.sources.items():
            images = batch[slot].to(self.device)
            encoded = self.stage.clip.encode(images)
            blank = drop_image.clone().to(self.device)
            if slot == "cloth":
                blank |= ~batch["has_cloth"].to(self.device)
            arcface = batch["arcface"].to(self.device) if slot == "face" else torch.zeros(len(images), 512)
            features = ImageFeatures(encoded.image_embeds, encoded.penultimate_hidden_states, arcface.to(self.device))
            for name in ("image_embeds", "penultimate_hidden_states", "arcface"):
                value, empty = getattr(features, name), getattr(self.blank, name).to(self.device)
                setattr(features, name, torch.where(blank.view(-1, *[1] * (value.ndim - 1)), empty.expand_as(value),
                                                    value))
            out[slot] = features
        return out

    def _drops(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop text, drop image) per sample: IP-Adapter's exclusive text / image / both dropping."""
        data = self.config.data
        r = torch.rand(batch_size, generator=generator)
        text = r < data.drop_text
        image = (r >= data.drop_text) & (r < data.drop_text + data.drop_image)
        both = (r >= data.drop_text + data.drop_image) & (r < data.drop_text + data.drop_image + data.drop_both)
        return text | both, image | both

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The ε-prediction MSE of one batch (``pixels`` ``(B, F, 3, R, R)``)."""
        pixels = batch["pixels"].to(self.device)
        videos, frames = pixels.shape[:2]
        drop_text, drop_image = self._drops(videos, generator)
        with torch.no_grad():
            x = rearrange(pixels, "b f c h w -> (b f) c h w").to(self.weight_dtype) * 2 - 1
            latents = self.vae.encode(x).latent_dist.sample(generator).float() * self.vae.config.scaling_factor
            captions = ["" if drop else caption for caption, drop in zip(batch["caption"], drop_text.tolist())]
            text = repeat(self.text(captions), "b l c -> (b f) l c", f=frames)
            features = self._features(batch, drop_image) if self.stage.clip is not None else None
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (videos,), generator=generator)
        timesteps = timesteps.repeat_interleave(frames).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hint = batch.get("hint")
        hint = None if hint is None else rearrange(hint.to(self.device), "b f c h w -> (b f) c h w")
        pred = model(noisy.to(self.weight_dtype), timesteps, text.to(self.weight_dtype), frames, hint=hint,
                     features=features)
        return F.mse_loss(pred.float(), noise)

    # ------------------------------------------------------------------------------------------ the run

    def run(self, resume: str | Path | None = None) -> TrainResult:
        """Train to ``config.steps`` (from the checkpoint ``resume`` names, ``"latest"`` for the newest), export
        the result to ``output_dir`` and return the losses."""
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        trainable = self.stage.trainable
        optimizer = self._optimizer_class()(trainable.parameters(), lr=config.optimizer.lr,
                                            betas=config.optimizer.betas, eps=config.optimizer.eps,
                                            weight_decay=config.optimizer.weight_decay)
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                     num_warmup_steps=config.optimizer.warmup_steps * accelerator.num_processes)
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        model, optimizer, lr_scheduler = accelerator.prepare(self.stage.denoiser, optimizer, lr_scheduler)
        ema = EMAModel(trainable.parameters(), decay=config.ema.decay) if config.ema.enabled else None
        if ema is not None:
            ema.to(self.device)

        done = 0
        if resume is not None:
            folder = latest_checkpoint(self.output_dir) if str(resume) == "latest" else Path(resume)
            if folder is None or not (folder / STATE_FILE).is_file():
                raise ConfigError(f"--resume: no training checkpoint at '{folder or self.output_dir / 'checkpoints'}'"
                                  f" (expected a folder with {STATE_FILE})")
            done = self._load(folder, ema)
        accumulation = config.gradient_accumulation
        sampler = StepSampler(len(self.dataset), config.seed, accelerator.process_index, accelerator.num_processes,
                              start=done * config.batch_size * accumulation)
        loader = iter(DataLoader(self.dataset, batch_size=config.batch_size, sampler=sampler,
                                 num_workers=config.data.workers, persistent_workers=config.data.workers > 0))
        accelerator.init_trackers(f"dreamoving_{config.stage}", config=_flat(config.to_dict()))
        result = TrainResult(None, done, world_size=accelerator.num_processes)
        progress = tqdm(total=config.steps, initial=done, desc=config.stage,
                        disable=not accelerator.is_local_main_process)
        model.train()
        started, frames_per_step = time.perf_counter(), config.batch_size * accumulation * config.data.frames
        for step in range(done + 1, config.steps + 1):
            losses = []
            for micro in range(accumulation):
                batch = next(loader)
                generator = _generator(config.seed, step, micro, accelerator.process_index)
                with accelerator.accumulate(model):
                    loss = self.loss(model, batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable.parameters(), config.optimizer.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                losses.append(loss.detach())
            if ema is not None:
                ema.step(trainable.parameters())
            local = torch.stack(losses).mean()
            result.losses.append(float(local))
            result.steps = step
            progress.update(1)
            if step % config.log_every == 0 or step == config.steps:
                mean = accelerator.gather(local[None]).mean().item()
                seconds = time.perf_counter() - started
                rate = (step - done) * frames_per_step * accelerator.num_processes / max(seconds, 1e-9)
                progress.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                accelerator.log({"train/loss": mean, "train/lr": lr_scheduler.get_last_lr()[0],
                                 "train/frames_per_second": rate}, step=step)
            if step % config.checkpoint_every == 0 and step != config.steps:
                self._save(step, ema)
            if config.validation.every and (step % config.validation.every == 0 or step == config.steps):
                self._validate(model, step, ema)
        progress.close()
        self._save(result.steps, ema)
        if accelerator.is_main_process:
            result.output = self.output_dir / self.spec.output
            self._export(result.output, result.steps, ema)
        result.weights_sha256 = self._check_ranks_agree()
        accelerator.end_training()
        return result

    # ------------------------------------------------------------------------- checkpoints, export, ranks

    def _exported(self, ema) -> torch.nn.Module:
        """A CPU copy of the trained module in ``export_dtype`` (the EMA weights when EMA is on)."""
        module = copy.deepcopy(self.stage.trainable)
        if ema is not None:
            ema.copy_to(module.parameters())
        return module.to("cpu", DTYPES[self.config.export_dtype]).eval().requires_grad_(False)

    def _export(self, path: Path, step: int, ema) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        export(self.spec, self._exported(ema), path, {**self.metadata, "steps": str(step),
                                                     "ema": "true" if ema is not None else "false"})

    def _save(self, step: int, ema) -> None:
        """The full training state of ``step`` in ``checkpoints/step-NNNNNN`` (+ the result exported in it);
        only the newest ``keep_checkpoints`` are kept."""
        accelerator, folder = self.accelerator, self.output_dir / "checkpoints" / f"step-{step:06d}"
        accelerator.save_state(str(folder), safe_serialization=True)
        if accelerator.is_main_process:
            state = {"step": step, "stage": self.config.stage}
            if ema is not None:
                ema_state = ema.state_dict()
                save_state_dict({str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}, folder / EMA_FILE)
                state["ema"] = ema_state
            self._export(folder / self.spec.output, step, ema)
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
            for old in sorted((self.output_dir / "checkpoints").glob("step-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _load(self, folder: Path, ema) -> int:
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("stage") != self.config.stage:
            raise ConfigError(f"--resume: '{folder}' is a {state.get('stage')} checkpoint, not {self.config.stage}")
        self.accelerator.load_state(str(folder))
        if ema is not None:
            if "ema" not in state:
                raise ConfigError(f"--resume: '{folder}' was saved without EMA; set ema.enabled=false")
            shadow = load_state_dict(folder / EMA_FILE)
            ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        return int(state["step"])

    def _check_ranks_agree(self) -> str:
        """The trained weights' digest, after checking every process holds the same weights."""
        digest = weights_digest(self.stage.trainable)
        print(f"[rank {self.accelerator.process_index}/{self.accelerator.num_processes}] trained weights sha256 "
              f"{digest}", flush=True)
        mine = torch.tensor([int(digest[i:i + 12], 16) for i in range(0, 60, 12)], device=self.device)
        everyone = self.accelerator.gather(mine[None]).view(self.accelerator.num_processes, -1)
        if not bool((everyone == everyone[0]).all()):
            raise RuntimeError("the processes finished with different weights; distributed training went out of sync")
        return digest

    # ---------------------------------------------------------------------------------------- validation

    def _validate(self, model, step: int, ema) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            denoiser = accelerator.unwrap_model(model)
            if ema is not None:
                ema.store(self.stage.trainable.parameters())
                ema.copy_to(self.stage.trainable.parameters())
            denoiser.eval()
            try:
                frames, driving, face = self._sample(denoiser)
            finally:
                denoiser.train()
                if ema is not None:
                    ema.restore(self.stage.trainable.parameters())
            write_frames(frames, self.output_dir / "validation" / f"step-{step:06d}")
            values = {}
            if self.scorer is not None:
                values = {f"val/{k}": float(v) for k, v in self.scorer(frames, driving=driving, face=face).items()}
            tracker = accelerator.get_tracker("tensorboard")
            tracker.log_images({"val/frames": frames.numpy()}, step=step, dataformats="NHWC")
            if values:
                accelerator.log(values, step=step)
        accelerator.wait_for_everyone()

    def _sample(self, denoiser) -> tuple[torch.Tensor, list[dict] | None, torch.Tensor | None]:
        """The validation video of manifest row ``validation.index``, its driving poses and reference face."""
        config, validation = self.config, self.config.validation
        item = (validation.index % len(self.validation_set), sample_seed(validation.seed, 0))
        sample = self.validation_set[item]
        caption = validation.prompt if validation.prompt is not None else sample["caption"]
        text, uncond = self.text([caption]), self.text([""])
        face = image_tensor(validation.face) if validation.face else None
        features = hint = driving = None
        if self.stage.clip is not None:
            batch = {k: (v[None] if torch.is_tensor(v) else torch.tensor([v]) if isinstance(v, bool) else [v])
                     for k, v in sample.items()}
            features = self._features(batch, torch.zeros(1, dtype=torch.bool))
            face = sample["face"] if face is None else face
        if "hint" in sample:
            hint = sample["hint"]
            poses = self.validation_set.driving_poses(item)
            driving = None if poses is None else crop_poses(poses, config.data.resolution)
        frames = sample["pixels"].shape[0]
        blank = {slot: self.blank for slot in (features or {})}
        return (sample_frames(denoiser, self.vae, text, uncond, frames, config.data.resolution, config.noise_schedule,
                              validation.steps, validation.cfg, torch.Generator().manual_seed(validation.seed),
                              hint=hint, features=features, blank=blank), driving, face)


def _exists(path: str | None, key: str, what: str) -> str:
    if path is None:
        raise ConfigError(f"{key} is not set; it needs {what}")
    if not Path(path).is_file():
        raise ConfigError(f"{key}: '{path}' does not exist ({what})")
    return path


def _flat(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """A nested config as flat ``a/b`` scalars (what TensorBoard's hparams take)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}/"))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(config: TrainConfig, *, resume: str | Path | None = None, scorer: Scorer | None = None) -> TrainResult:
    """Run one training stage (see :class:`Trainer`); the Python entry of ``python -m dreamoving_core.train``."""
    return Trainer(config, scorer).run(resume)

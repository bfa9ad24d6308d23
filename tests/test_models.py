"""``python dev.py models`` against a local HTTP server on 127.0.0.1 serving tiny files in the real formats: what is
present, missing or of the wrong kind; downloads with resume (HTTP Range) and a final check by our loaders."""
from __future__ import annotations

import http.server
import shutil
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devtools import models as cli
from dreamoving_core.catalog import BY_NAME, CATALOG, check_model, download_file
from dreamoving_core.errors import DreaMovingError, ModelFormatError


class Mirror(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with Range support and records each request's Range header."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        data = self.server.files.get(self.path)
        self.server.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def _zip_folder(folder: Path) -> bytes:
    archive = folder.parent / f"{folder.name}-test.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.iterdir()):
            z.write(path, path.name)  # like InsightFace's release: the files at the top of the archive
    return archive.read_bytes()


@pytest.fixture(scope="module")
def mirror():
    """Every catalogue file served from 127.0.0.1 under its real URL's path, as tiny files of the real formats."""
    from devtools.demo import TINY_MODELS

    builders = {}  # the tiny file for each model, built as for the node input that loads it in a shipped workflow
    for graph in cli.shipped_workflows().values():
        for node in graph.values():
            for name, value in node["inputs"].items():
                if (node["class_type"], name) in TINY_MODELS and isinstance(value, str):
                    builders.setdefault(value, TINY_MODELS[(node["class_type"], name)](value))
    files = {}
    for model in CATALOG:
        built = builders[model.name]
        for relative, url in model.files:
            path = urlsplit(url).path
            if url.endswith(".zip"):
                files[path] = _zip_folder(built)
            else:
                files[path] = ((built / relative) if relative else built).read_bytes()
    server = Mirror(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def test_an_empty_models_folder_lists_every_model_as_missing_with_its_url(tmp_path, capsys):
    code, out = run_cli(capsys, "--models", str(tmp_path))
    assert code == 1
    for model in CATALOG:
        assert f"missing    {model.target('').as_posix().lstrip('/')}" in out, model.name
    assert BY_NAME[("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors")].url in out
    assert "DreaMoving 2. Face photo + dance video: needs" in out
    assert "run again with --download" in out


def test_download_fetches_every_missing_model_checks_it_and_reports_ready(tmp_path, capsys, mirror):
    code, out = run_cli(capsys, "--models", str(tmp_path), "--download", "--mirror", mirror.url)
    assert code == 0, out
    for model in CATALOG:
        path = model.target(tmp_path)
        assert path.exists(), model.name
        check_model(model, path)
    assert (tmp_path / "insightface" / "models" / "buffalo_l" / "det_10g.onnx").is_file(), "the archive is unpacked"
    assert (tmp_path / "dreamoving" / "preprocess" / "zoedepth-nyu-kitti" / "config.json").is_file()
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.zip"))
    assert out.count("present") == len(CATALOG) and "needs" not in out
    code, out = run_cli(capsys, "--models", str(tmp_path))
    assert code == 0 and "ready" in out


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, mirror):
    model = BY_NAME[("controlnet", "control_v11p_sd15_openpose_fp16.safetensors")]
    path = urlsplit(model.url).path
    whole = mirror.files[path]
    target = tmp_path / model.name
    (tmp_path / f"{model.name}.partial").write_bytes(whole[:1000])
    seen = []
    download_file(mirror.url + path, target, progress=lambda done, total: seen.append((done, total)))
    assert target.read_bytes() == whole
    assert (path, "bytes=1000-") in mirror.requests
    assert seen[-1] == (len(whole), len(whole)) and seen[0][0] > 1000, "progress counts the resumed bytes"


def test_a_file_of_the_wrong_kind_is_reported_with_the_loaders_reason_and_never_replaced(tmp_path, capsys, mirror):
    from devtools.tiny.motion import motion_module

    wrong = tmp_path / "controlnet" / "control_v11p_sd15_openpose_fp16.safetensors"
    wrong.parent.mkdir(parents=True)
    shutil.copy(motion_module("v2", "safetensors"), wrong)
    before = wrong.read_bytes()
    code, out = run_cli(capsys, "--models", str(tmp_path), "--workflow", "Text prompt + pose", "--download",
                        "--mirror", mirror.url)
    assert code == 1
    line = next(ln for ln in out.splitlines() if "control_v11p_sd15_openpose_fp16" in ln)
    assert line.split()[0:2] == ["WRONG", "KIND"] and "motion module" in line.lower(), line
    assert wrong.read_bytes() == before, "a user's file is never overwritten"
    assert "DreaMoving 1. Text prompt + pose video: needs control_v11p_sd15_openpose_fp16.safetensors" in out


def test_a_download_that_is_not_the_model_fails_its_final_check(tmp_path, mirror):
    from dreamoving_core.catalog import download

    model = BY_NAME[("animatediff_models", "mm_sd_v15_v2.ckpt")]
    swapped = BY_NAME[("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")]
    with pytest.raises(DreaMovingError, match="the download of mm_sd_v15_v2.ckpt is not a motion_module"):
        download(model, tmp_path, url_for=lambda url: mirror.url + urlsplit(swapped.url).path)
    assert not model.target(tmp_path).exists(), "a download that is not the model does not stay"


def test_an_unreachable_file_is_a_clear_error(tmp_path, mirror):
    with pytest.raises(DreaMovingError, match="HTTP 404"):
        download_file(mirror.url + "/no/such/file.safetensors", tmp_path / "x.safetensors")


def test_checkpoint_check_tells_sd15_from_other_families(tmp_path):
    from safetensors.torch import save_file
    import torch

    model = BY_NAME[("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors")]
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048)},
              str(sdxl))
    with pytest.raises(ModelFormatError, match="is an SDXL checkpoint"):
        check_model(model, sdxl)

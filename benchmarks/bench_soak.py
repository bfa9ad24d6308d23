"""Soak: many prompts from two clients against one real ComfyUI server, plain SD1.5 and full DreaMoving in turn.

    python benchmarks/bench_soak.py                      # 200 prompts, 2 clients, tiny random models, CPU
    python benchmarks/bench_soak.py --prompts 40 --steps 2

The full prompt is the shipped demo graph (dance video → DWPose → pose Video ControlNet + motion module + face
Content Guider → KSampler) on tiny models, ending in a SaveLatent; the plain prompt is the same checkpoint, text and
sampler without any DreaMoving node. Each prompt's text differs from the others by trailing spaces only, so ComfyUI
runs the sampler every time (the loaders stay cached, as in real use) while the output must stay the same. Prints
every 10 prompts the server's resident memory and the rate; at the end the deviations (outputs not bit-identical to
the first of their kind), the memory growth after warm-up and prompts per minute. Baseline (the hostile-input
audit): 0 deviations in 200, RSS flat after warm-up.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.client import ComfyClient  # noqa: E402
from devtools.demo import install_tiny_models, load_graph  # noqa: E402
from devtools.host import cache_dir, current_comfy_dir  # noqa: E402
from devtools.server import ComfyServer  # noqa: E402

OUTPUTS = ("SaveVideo", "CreateVideo", "VAEDecode", "SaveImage", "PreviewImage")


def _source(graph: dict, node_id: str, name: str, target: str) -> list:
    """The link feeding ``node_id``'s input ``name``, followed upstream (through the input of the same name) to the
    first node of class ``target``: ``[id, output]``."""
    link = graph[node_id]["inputs"][name]
    while graph[link[0]]["class_type"] != target:
        link = graph[link[0]]["inputs"][name]
    return link


def graphs(base: Path, steps: int | None) -> tuple[dict, dict]:
    """(full DreaMoving, plain) API graphs ending in SaveLatent, tiny models installed into ``base``."""
    full = install_tiny_models(load_graph(), base)
    full = {k: v for k, v in full.items() if v["class_type"] not in OUTPUTS}
    sampler = next(k for k, v in full.items() if v["class_type"] == "KSampler")
    if steps:
        full[sampler]["inputs"]["steps"] = steps
    full["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "soak/full"}}
    plain = copy.deepcopy(full)
    plain[sampler]["inputs"]["model"] = _source(full, sampler, "model", "CheckpointLoaderSimple")
    for name in ("positive", "negative"):
        plain[sampler]["inputs"][name] = _source(full, sampler, name, "CLIPTextEncode")
    plain["save"]["inputs"]["filename_prefix"] = "soak/plain"
    return full, plain


def respaced(graph: dict, spaces: int) -> dict:
    """``graph`` with ``spaces`` trailing spaces on every prompt text (same tokens, so the same output)."""
    out = copy.deepcopy(graph)
    for node in out.values():
        if node["class_type"] == "CLIPTextEncode":
            node["inputs"]["text"] = node["inputs"]["text"].rstrip() + " " * spaces
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200, help="prompts in all (half plain, half DreaMoving)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the demo graph's)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the soak gives up")
    args = parser.parse_args()
    comfy_dir = current_comfy_dir()  # COMFYUI_DIR, else the pinned host
    base = Path(tempfile.mkdtemp(prefix="soak-", dir=cache_dir()))  # beside the tiny models: hard links work
    full, plain = graphs(base, args.steps)
    server = ComfyServer(comfy_dir, base).start()
    process = psutil.Process(server.proc.pid)
    spaces = itertools.count(1)
    lock = threading.Lock()
    reference: dict[str, object] = {}
    done: list[tuple[str, bool]] = []
    errors: list[str] = []
    started = time.monotonic()
    deadline = started + args.timeout

    rss_log: list[float] = []

    def report() -> None:
        rss = process.memory_info().rss / 2**20
        minutes = (time.monotonic() - started) / 60
        deviations = sum(not same for _, same in done)
        print(f"[soak] {len(done):4d} prompts  RSS {rss:7.1f} MiB  {len(done) / minutes:5.1f} prompts/min  "
              f"deviations {deviations}", flush=True)
        rss_log.append(rss)

    def client_loop(index: int, count: int) -> None:
        client = ComfyClient(server.url, output_dir=base / "output")
        try:
            for i in range(count):
                kind, graph = ("plain", plain) if (i + index) % 2 == 0 else ("full", full)
                with lock:
                    graph = respaced(graph, next(spaces))
                if time.monotonic() > deadline:
                    return
                result = client.run(graph, timeout=max(1.0, deadline - time.monotonic()))
                path = result.files("save")[-1]
                latent = load_file(str(path))["latent_tensor"]
                with lock:
                    same = bool(reference.setdefault(kind, latent).equal(latent))
                    done.append((kind, same))
                    if len(done) % 10 == 0:
                        report()
        except Exception as err:  # noqa: BLE001  (reported below; the soak ends)
            errors.append(f"client {index}: {err}")
        finally:
            client.close()

    try:
        per_client = [args.prompts // args.clients + (i < args.prompts % args.clients) for i in range(args.clients)]
        threads = [threading.Thread(target=client_loop, args=(i, n)) for i, n in enumerate(per_client)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    deviations = [kind for kind, same in done if not same]
    warm = rss_log[min(2, len(rss_log) - 1)] if rss_log else float("nan")
    print(f"[soak] {len(done)} of {args.prompts} prompts in {minutes:.1f} min ({len(done) / minutes:.1f} prompts/min), "
          f"{len(deviations)} deviations ({', '.join(sorted(set(deviations))) or 'none'}); RSS after warm-up "
          f"{warm:.0f} MiB, at the end {rss_log[-1] if rss_log else float('nan'):.0f} MiB")
    for err in errors:
        print(f"[soak] error: {err}", file=sys.stderr)
    return 1 if deviations or errors or len(done) < args.prompts else 0


if __name__ == "__main__":
    sys.exit(main())

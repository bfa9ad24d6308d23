"""The GPU benchmark runs end to end on the CPU at its tiny size (so the lent GPU's few minutes are not spent on a
script that fails), and reports every section the issue asks for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--rounds", "1", "--steps", "1",
                           "--json", str(out)], cwd=PACK, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    variants = {(row["variant"], row.get("compiled")) for row in results["steps"]}
    assert {("+ guider (face + cloth)", False), ("+ guider (face + cloth)", True)} <= variants
    assert any(row["variant"].startswith("diffusers") for row in results["steps"])
    assert all(row["ms"] > 0 for row in results["steps"])
    assert all("time_per_flop" in row for row in results["steps"] if row["variant"].startswith("+"))
    assert [row["frames"] for row in results["memory"]] == [4, 8, 16]
    assert results["video"]["total_s"] > 0 and results["video"]["decode_peak_mib"]["tiled"] > 0
    assert {row["backend"] for row in results["dwpose"]} == {"onnxruntime", "torch"}
    assert results["temporal"]

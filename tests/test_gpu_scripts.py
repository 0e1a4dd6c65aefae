"""The GPU benchmark scripts run end to end on the tiny builtins (their CPU path), so the first
session with a GPU does not spend its minutes on a script that no longer runs."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_memory_rows_run_and_sit_beside_their_plans(tmp_path):
    from tuner.cli import bench_memory

    table = bench_memory.rows(tiny=True)
    assert [r["baseline"] for r in table if r["name"].startswith("z-image fp8")] == [
        None,
        "z-image fp8 N=0",
        "z-image fp8 N=0",
    ]
    results = bench_memory.main(["--tiny", "--only", "flux-dev fp8 N=16", "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["flux-dev fp8 N=16"]
    assert "error" not in results[0], results
    assert results[0]["plan_training_gib"] is not None
    assert results[0]["block_copies_per_step"] > 0  # blocks really swapped
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved] == ["flux-dev fp8 N=16"]
    assert "| flux-dev fp8 N=16 |" in (tmp_path / "results.md").read_text()


def test_z_image_bench_trains_with_fp8_and_block_swap(capsys):  # bench_flux: the row above
    from tuner.cli import bench_z_image

    args = ["--tiny", "--quantize", "fp8", "--offload-blocks", "2", "--optimizer", "adamw"]
    bench_z_image.main([*args, "--resolution", "64", "--steps", "2", "--caption", "8"])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :])
    assert result["quantize"] == "fp8" and result["offload_blocks"] == 2
    assert result["block_copies_per_step"] > 0


def test_bench_gpu_tiny_flux_rows_run(tmp_path):
    from tuner.cli import bench_gpu

    results = bench_gpu.main(["--tiny", "--only", "flux", "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["flux-dev 1024 bf16", "flux-dev 1024 nf4"]
    assert "error" not in results[0], results[0]  # the bf16 row runs on the CPU

"""FSDP2 (`./launch.sh --config-file recipes/accelerate/fsdp2.yaml`), on CPU with 2 gloo
processes: the same adapter as one process with the same global batch, and a resumed sharded
run equals the uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuner.adapters.lora import WEIGHT_NAME

REPO = Path(__file__).resolve().parents[2]
# What accelerate's launcher sets from recipes/accelerate/fsdp2.yaml (checked below).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "1"}


def recipe_file(tmp_path: Path, style_dir: Path, out: str, **train) -> Path:
    raw = {
        "model": {"path": "builtin:tiny-flux"},
        "adapter": {"rank": 4, "dropout": 0.0},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 32,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "steps": 4,
            "batch_size": 2,
            "lr": 5e-3,
            "seed": 3,
            "max_sequence_length": 16,
            "lr_scheduler": "constant",
            **train,
        },
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / out), "save_every": 2, "keep": 10},
        "log": {"every": 1},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(cmd: list[str], fsdp: bool, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fsdp:
        env.update(FSDP_ENV)
    started = time.perf_counter()
    result = subprocess.run(
        [*cmd, *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    print(f"{' '.join(cmd[-3:])}: {time.perf_counter() - started:.1f}s")
    errors = [line for line in result.stderr.splitlines() if "rror" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) or result.stderr[-3000:]
    return result


def one_process(path: Path, *overrides: str):
    return run([sys.executable, "-m", "tuner", "train", str(path)], False, *overrides)


def two_processes(path: Path, *overrides: str):
    return run([sys.executable, "-m", "tuner.cli.launch", "2", str(path)], True, *overrides)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_and_resume(tmp_path, style_dir):
    one = recipe_file(tmp_path, style_dir, "one", batch_size=2)
    one_process(one)
    full = recipe_file(tmp_path, style_dir, "full", batch_size=1)
    result = two_processes(full)
    assert "FSDP2: the denoiser is sharded over 2 processes" in result.stderr
    a, b = (
        load_file(str(tmp_path / "one" / WEIGHT_NAME)),
        load_file(str(tmp_path / "full" / WEIGHT_NAME)),
    )
    print(f"1 process vs 2 FSDP processes: max abs diff {max_diff(a, b):.3g}")
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k or "up" in k)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key

    # Interrupted at step 2 (a 2-step run), resumed to 4: the uninterrupted adapter.
    part = recipe_file(tmp_path, style_dir, "part", batch_size=1, steps=2)
    two_processes(part)
    resumed = two_processes(part, "train.steps=4", "train.resume=latest")
    assert "resumed from" in resumed.stderr and "trained steps 3-4" in resumed.stderr
    c = load_file(str(tmp_path / "part" / WEIGHT_NAME))
    print(f"resumed vs uninterrupted FSDP run: max abs diff {max_diff(b, c):.3g}")
    for key in b:
        assert torch.allclose(b[key], c[key], atol=1e-6, rtol=1e-4), key


def test_fsdp2_config_is_what_the_sharding_reads():
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2

"""Shared fixtures: tiny datasets and recipes that train in seconds on a CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread: tiny models gain nothing from more, and on a shared CPU a second spinning thread
# costs up to 10x (test_loss_falls_when_memorizing_two_images: 409 s at 2 threads, 35 s at 1,
# both at load ~7 on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _rescue_dir(tmp_path, monkeypatch):
    """A checkpoint that cannot go to output.dir is rescued into the test's own folder, not
    the system temp folder."""
    monkeypatch.setenv("TUNER_RESCUE_DIR", str(tmp_path / "rescue"))


@pytest.fixture
def style_dir(tmp_path: Path) -> Path:
    """Four images + captions copied from the shipped toy style set."""
    folder = tmp_path / "style"
    folder.mkdir()
    for png in sorted((REPO / "datasets" / "toy-stripes").glob("*.png"))[:4]:
        shutil.copy(png, folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder / png.with_suffix(".txt").name)
    return folder


@pytest.fixture
def make_recipe(tmp_path: Path, style_dir: Path):
    """Build a validated tiny recipe; keyword overrides use dotted keys."""
    from tuner.recipe import apply_overrides, validate_recipe

    def build(*overrides: str, base: str = "builtin:tiny-sd15"):
        raw = {
            "model": {"path": base},
            "adapter": {"rank": 4, "alpha": 4},
            "data": {
                "datasets": [{"path": str(style_dir)}],
                "resolution": 64,
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "seed": 0},
            "sample": {"prompts": []},
            "output": {"dir": str(tmp_path / "out"), "overwrite": True},
            "log": {"every": 1},
        }
        return validate_recipe(apply_overrides(raw, overrides))

    return build

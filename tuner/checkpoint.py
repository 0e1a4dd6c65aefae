"""Checkpoints: atomic folders `checkpoints/step-NNNNNN/`, retention, and finding `latest`.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete,
so `latest` never picks a half-written one, and an interrupted save loses nothing older.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from tuner.errors import TunerError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "tuner_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            return None  # nothing saved yet: start fresh, which is what the user meant
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise TunerError(
            f"train.resume: {resume} is not a complete tuner checkpoint folder; "
            "use 'latest' or a checkpoints/step-NNNNNN folder"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_checkpoint(
    output_dir: Path, step: int, save_contents, state: dict, is_main: bool, keep: int
) -> Path:
    """save_contents(tmp_dir) writes everything; then the folder is published atomically."""
    root = Path(output_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    save_contents(tmp)
    if is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(output_dir, keep)
    return final


def prune(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    # Make the bytes durable before the rename publishes them (a crash right after a rename
    # must not leave a "complete" folder of empty files).
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())

"""An output folder belongs to one run: a fresh run never trains into another run's
checkpoints, a failed overwrite changes nothing, retention deletes only the run's own
checkpoints, and an output.dir inside a dataset folder is not read back as training data."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from tuner.cli import main
from tuner.training import checkpoint
from tuner.training.outputs import FINISHED, RUN_FILE


def run_cli(tmp_path: Path, capsys, raw: dict, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def raw(tmp_path, style_dir) -> dict:
    return {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": 2, "batch_size": 2},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out"), "save_every": 1, "keep": 5},
    }


def unfinished(tmp_path, capsys, raw) -> Path:
    """A run that saved checkpoints and never finished (killed after its last save)."""
    assert run_cli(tmp_path, capsys, raw)[0] == 0
    out = tmp_path / "out"
    (out / FINISHED).unlink()
    return out


def finished(tmp_path, capsys, raw) -> Path:
    assert run_cli(tmp_path, capsys, raw)[0] == 0
    return tmp_path / "out"


# input -> exit code -> the one line; and every file in the folder is unchanged.
@pytest.mark.parametrize(
    "folder, overrides, code, line",
    [
        (
            unfinished,
            [],
            2,
            "error: output.dir: {out} holds an unfinished run (last checkpoint: step 2); "
            "resume it with: ./launch.sh {recipe} train.resume=latest; or choose another "
            "output.dir, or set output.overwrite=true to replace it",
        ),
        (
            unfinished,
            ["train.seed=7"],
            2,
            "error: output.dir: {out} holds an unfinished run (last checkpoint: step 2); "
            "resume it with: ./launch.sh {recipe} train.seed=7 train.resume=latest; or choose "
            "another output.dir, or set output.overwrite=true to replace it",
        ),
        (
            finished,
            ["output.overwrite=true", "data.datasets.0.path=/nonexistent"],
            2,
            "error: /nonexistent: dataset path not found; check data.datasets[..].path",
        ),
        (
            finished,
            ["output.overwrite=true", "model.path=./no-model-here"],
            2,
            "error: model.path: ./no-model-here not found",
        ),
        (
            finished,
            ["output.overwrite=true", "model.path=builtin:tiny-sd99"],
            2,
            "error: model.path: unknown builtin 'builtin:tiny-sd99'",
        ),
        (
            # found only when loading, after the data is read
            finished,
            ["output.overwrite=true", "model.path={tmp}/empty-model", "model.family=sd15"],
            2,
            "error: model.path: {tmp}/empty-model has no model_index.json",
        ),
        (
            unfinished,
            ["output.overwrite=true", "data.datasets.0.path=/nonexistent"],
            2,
            "error: /nonexistent: dataset path not found; check data.datasets[..].path",
        ),
    ],
    ids=[
        "fresh-into-unfinished",
        "fresh-into-unfinished-with-overrides",
        "overwrite-bad-dataset",
        "overwrite-unknown-model",
        "overwrite-unknown-builtin",
        "overwrite-model-fails-to-load",
        "overwrite-unfinished-bad-dataset",
    ],
)
def test_refused_runs_leave_the_folder_exactly_as_it_was(
    tmp_path, capsys, raw, folder, overrides, code, line
):
    out = folder(tmp_path, capsys, raw)
    before = tree_digest(out)
    assert before  # a real run is there: adapter or checkpoints, recipe.yaml, tuner_run.json
    (tmp_path / "empty-model").mkdir()
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    got_code, got_line = run_cli(tmp_path, capsys, raw, *overrides)
    assert got_code == code
    expected = line.format(out=out, recipe=tmp_path / "recipe.yaml", tmp=tmp_path)
    assert got_line.startswith(expected), got_line
    assert tree_digest(out) == before


def test_fresh_run_into_unfinished_run_keeps_its_checkpoints(tmp_path, capsys, raw):
    """The old behaviour: the fresh run trained, and retention (highest steps win) deleted
    the fresh run's own checkpoints as soon as they were written."""
    out = unfinished(tmp_path, capsys, raw)
    saved = [p.name for p in checkpoint.complete_checkpoints(out)]
    assert run_cli(tmp_path, capsys, raw, "train.steps=1")[0] == 2
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == saved


def test_overwrite_that_starts_says_what_it_replaces(tmp_path, capsys, raw, caplog):
    caplog.set_level(logging.INFO, logger="tuner")
    out = finished(tmp_path, capsys, raw)
    old_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert run_cli(tmp_path, capsys, raw, "output.overwrite=true", "train.steps=1")[0] == 0
    lines = [r.getMessage() for r in caplog.records if "output.overwrite" in r.getMessage()]
    assert lines == [
        f"output.overwrite: replacing the finished run {old_id} in {out} (2 steps); "
        "its 2 checkpoints are deleted"
    ]
    new_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert new_id != old_id
    left = checkpoint.complete_checkpoints(out)
    assert [p.name for p in left] == ["step-000001"]
    assert checkpoint.read_state(left[0])["run_id"] == new_id


def test_every_checkpoint_records_the_run_and_resume_continues_it(tmp_path, capsys, raw):
    out = unfinished(tmp_path, capsys, raw)
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert {checkpoint.read_state(p)["run_id"] for p in checkpoint.complete_checkpoints(out)} == {
        run_id
    }
    code, _ = run_cli(tmp_path, capsys, raw, "train.steps=4", "train.resume=latest")
    assert code == 0
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == run_id
    states = [checkpoint.read_state(p) for p in checkpoint.complete_checkpoints(out)]
    assert [s["step"] for s in states] == [1, 2, 3, 4]
    assert {s["run_id"] for s in states} == {run_id}


# retention: which checkpoints a save at step 8 (run "mine", keep=2) leaves behind.
@pytest.mark.parametrize(
    "existing, kept",
    [
        ({2: "mine", 4: "mine", 6: "mine"}, [6, 8]),
        ({200: "other", 300: "other"}, [8, 200, 300]),
        ({2: "mine", 4: "mine", 500: "other"}, [4, 8, 500]),
        ({2: None, 4: None}, [2, 4, 8]),
    ],
    ids=["own-run", "other-run-only", "mixed", "unrecorded"],
)
def test_retention_deletes_only_the_runs_own_checkpoints(tmp_path, existing, kept):
    out = tmp_path / "run"
    for step, run_id in existing.items():
        state = {"step": step, **({"run_id": run_id} if run_id else {})}
        checkpoint.write_checkpoint(out, step, lambda folder: None, state, True, keep=10)
    checkpoint.write_checkpoint(
        out, 8, lambda folder: None, {"step": 8, "run_id": "mine"}, True, keep=2
    )
    names = [p.name for p in checkpoint.complete_checkpoints(out)]
    assert names == [checkpoint.step_dir_name(s) for s in kept]


def test_output_dir_inside_the_dataset_is_not_training_data(
    tmp_path, capsys, raw, style_dir, caplog
):
    caplog.set_level(logging.INFO, logger="tuner")
    out = style_dir / "outputs" / "run"
    (out / "samples").mkdir(parents=True)
    for png in sorted(style_dir.glob("*.png")):  # an earlier run's sample grids
        shutil.copy(png, out / "samples" / png.name)
    code, _ = run_cli(tmp_path, capsys, raw, f"output.dir={out}")
    assert code == 0
    messages = [r.getMessage() for r in caplog.records]
    assert f"{style_dir}: skipping {out} (the output.dir): its files are not training data" in (
        messages
    )
    assert any(m.startswith("4 training images") for m in messages), messages


def test_output_dir_that_is_the_dataset_folder_is_refused(tmp_path, capsys, raw, style_dir):
    before = tree_digest(style_dir)
    code, line = run_cli(tmp_path, capsys, raw, f"output.dir={style_dir}")
    assert code == 2
    assert line == (
        f"error: output.dir: {style_dir} is the folder of data.datasets[0].path; "
        "choose an output.dir outside the dataset"
    )
    assert tree_digest(style_dir) == before

"""Bad input gets one line naming the problem, exit code 2, no traceback; nothing is lost."""

from __future__ import annotations

import pytest
import torch
import yaml

from tuner.cli import main


def run_cli(tmp_path, capsys, recipe_raw: dict, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_raw))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def raw(tmp_path, style_dir) -> dict:
    return {
        "model": {"path": "builtin:tiny-sd15"},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": 1},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out")},
    }


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        (
            "missing dataset",
            ["data.datasets.0.path=/no/such/folder"],
            "/no/such/folder: dataset path not found",
        ),
        ("unknown family", ["model.family=sd9"], "model.family: unknown family 'sd9'"),
        (
            "model path not found",
            ["model.path=./no-model-here"],
            "model.path: ./no-model-here not found",
        ),
        (
            "unknown builtin",
            ["model.path=builtin:tiny-sd99"],
            "unknown builtin 'builtin:tiny-sd99'",
        ),
        ("resolution", ["data.resolution=100"], "resolution 100 is not a multiple of 8"),
        ("batch size", ["train.batch_size=0"], "train.batch_size: expected a value >= 1, got 0"),
        ("absurd resolution", ["data.resolution=100000"], "absurd"),
        ("pickle checkpoint", ["model.path=PICKLE"], "is a pickle file"),
    ],
)
def test_one_clear_line(tmp_path, capsys, raw, case, overrides, expected):
    if overrides == ["model.path=PICKLE"]:
        (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
        overrides = [f"model.path={tmp_path / 'model.ckpt'}", "model.family=sd15"]
    code, line = run_cli(tmp_path, capsys, raw, *overrides)
    assert code == 2, case
    assert line.startswith("error: ") and expected in line, line
    assert "Traceback" not in line


def test_empty_dataset_folder(tmp_path, capsys, raw):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, line = run_cli(tmp_path, capsys, raw, f"data.datasets.0.path={empty}")
    assert code == 2
    assert (
        line == f"error: {empty}: no usable images (supported: jpg, png, webp, bmp); add "
        "images or fix data.datasets[].path"
    )


def test_corrupt_image_is_skipped_with_a_named_warning(tmp_path, capsys, raw, style_dir, caplog):
    (style_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (style_dir / "empty.jpg").write_bytes(b"")
    code, _ = run_cli(tmp_path, capsys, raw)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("broken.png" in w and "unreadable image" in w for w in warnings)
    assert any("empty.jpg" in w for w in warnings)


def test_finished_run_is_not_overwritten(tmp_path, capsys, raw):
    assert run_cli(tmp_path, capsys, raw)[0] == 0
    adapter = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    before = adapter.read_bytes()
    code, line = run_cli(tmp_path, capsys, raw, "train.seed=5")
    assert code == 2 and "holds a finished run" in line
    assert adapter.read_bytes() == before  # nothing saved earlier was touched


def test_unwritable_output_dir(tmp_path, capsys, raw):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    code, line = run_cli(tmp_path, capsys, raw, f"output.dir={blocker}/out")
    assert code == 2 and "output.dir: cannot write to" in line


def test_debug_shows_the_traceback(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    from tuner.errors import TunerError

    with pytest.raises(TunerError):
        main(["--debug", "train", str(path), "model.path=./nothing"])


def test_empty_captions_warn_and_still_train(tmp_path, capsys, raw, style_dir, caplog):
    for txt in style_dir.glob("*.txt"):
        txt.write_text("  \n")
    code, _ = run_cli(tmp_path, capsys, raw)
    assert code == 0
    assert any("have no caption" in r.getMessage() for r in caplog.records)


def test_non_finite_steps_are_skipped_then_stop_keeping_the_checkpoint(
    tmp_path, style_dir, monkeypatch
):
    from tuner.errors import TunerError
    from tuner.recipe import validate_recipe
    from tuner.training import loop
    from tuner.training import run as train_module

    real = loop.compute_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        # Step 3 is poisoned once (skipped, training goes on); from step 6 on, every step.
        return loss * float("nan") if len(calls) == 3 or len(calls) >= 6 else loss

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    recipe = validate_recipe(
        {
            "model": {"path": "builtin:tiny-sd15"},
            "data": {
                "datasets": [{"path": str(style_dir)}],
                "resolution": 64,
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {"steps": 20, "nan_patience": 3, "lr": 1e-3},
            "sample": {"prompts": []},
            "output": {"dir": str(tmp_path / "out"), "save_every": 4},
        }
    )
    snapshots = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        snapshots.append(len(calls))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    with pytest.raises(TunerError, match="3 steps in a row had non-finite"):
        train_module.run_training(recipe)
    assert 3 not in snapshots and 1 in snapshots and 4 in snapshots  # step 3 skipped only
    checkpoint = tmp_path / "out" / "checkpoints" / "step-000004"
    assert (checkpoint / "tuner_state.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_builtin_toy_without_weights_says_how_to_make_them(tmp_path, capsys, raw, monkeypatch):
    import tuner.toy.base as toy_base

    monkeypatch.setattr(toy_base, "TOY_WEIGHTS", tmp_path / "no-weights")
    code, line = run_cli(tmp_path, capsys, raw, "model.path=builtin:toy")
    assert code == 2 and "tuner toy train-base" in line

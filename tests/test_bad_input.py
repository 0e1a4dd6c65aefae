"""Bad input gets one line naming the problem, exit code 2, no traceback; nothing is lost."""

from __future__ import annotations

import pytest
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

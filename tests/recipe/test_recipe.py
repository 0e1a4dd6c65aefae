"""Recipe loading, validation messages, overrides, and `tuner check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuner.cli import main
from tuner.errors import TunerError
from tuner.recipe import apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {
    "model": {"path": "builtin:tiny-sd15"},
    "data": {"datasets": [{"path": "datasets/toy-stripes"}], "resolution": 64},
    "train": {"steps": 2},
    "output": {"dir": "outputs/x"},
}


def write(tmp_path: Path, raw: dict, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(TunerError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_wrong_type_names_file_key_and_expectation(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_of(path, ["train.lr=fast"]) == f"{path}: train.lr: expected a number, got 'fast'"


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["train.lrr=0.1"])
    assert "train.lrr: unknown key" in message
    assert "did you mean 'train.lr'" in message


def test_unknown_section_and_nested_list_key(tmp_path):
    assert "trian: unknown key; did you mean 'train'" in error_of(
        write(tmp_path, {**MINIMAL, "trian": {}})
    )
    message = error_of(write(tmp_path, MINIMAL), ["data.datasets.0.repeat=2"])
    assert "data.datasets.0.repeat: unknown key; did you mean 'data.datasets.0.repeats'" in message


def test_missing_file_and_missing_required_key(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")
    raw = {k: v for k, v in MINIMAL.items() if k != "train"}
    assert "train: required key is missing" in error_of(write(tmp_path, raw))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.resolution=100", "data.resolution: resolution 100 is not a multiple of 8"),
        ("train.batch_size=0", "train.batch_size: expected a value >= 1, got 0"),
        ("model.family=sd9", "model.family: unknown family 'sd9'"),
        ("train.optimizer=sgd", "train.optimizer: expected one of 'adamw', 'adamw8bit', 'prodigy'"),
        ("train.mixed_precision=fp8", "train.mixed_precision: expected one of"),
    ],
)
def test_impossible_settings(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), [override])


def test_overrides_parse_yaml_set_nested_and_remove():
    raw = apply_overrides(
        MINIMAL,
        [
            "train.steps=7",
            "sample.seeds=[1, 2]",
            "data.datasets.0.repeats=3",
            "~output.dir",
            "adapter.text_encoder=true",
            "sample.prompts=[a=b]",
        ],
    )
    assert raw["train"]["steps"] == 7
    assert raw["sample"]["seeds"] == [1, 2]
    assert raw["data"]["datasets"][0]["repeats"] == 3
    assert "dir" not in raw["output"]
    assert raw["adapter"]["text_encoder"] is True
    assert raw["sample"]["prompts"] == ["a=b"]  # split on the first '=' only
    assert MINIMAL["train"]["steps"] == 2  # the input is not modified


def test_removing_an_absent_key_is_an_error():
    with pytest.raises(TunerError, match="'nothing' is not set"):
        apply_overrides(MINIMAL, ["~train.nothing"])


def test_check_prints_resolved_recipe(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["check", str(path), "train.steps=9"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 9
    assert resolved["adapter"]["rank"] == 16  # defaults are filled in


def test_check_error_is_one_line_without_traceback(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["check", str(path), "train.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: train.lr: expected a number, got 'fast'"


@pytest.mark.parametrize(
    "recipe",
    sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / "recipes").rglob("*.yaml")
        if "accelerate" not in p.parts  # accelerate launch configs, not recipes
    ),
)
def test_every_shipped_recipe_validates(recipe, monkeypatch, capsys, caplog):
    monkeypatch.chdir(REPO)
    with caplog.at_level("WARNING", logger="tuner"):
        loaded = load_recipe(recipe)
    assert loaded.train.steps >= 1
    # `tuner check` also runs the family's own checks when the family is known offline.
    assert main(["check", recipe]) == 0, capsys.readouterr().err
    assert "deprecated" not in caplog.text  # shipped recipes use train.flow


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=5", "model: expected a mapping, got 5"),
        ("adapter.rank=x", "adapter.rank: expected an integer, got 'x'"),
        ("data.resolution=big", "data.resolution: expected an integer, got 'big'"),
        ("data.datasets=folder", "data.datasets: expected a list, got 'folder'"),
        ("train.steps=many", "train.steps: expected an integer, got 'many'"),
        ("sample.seeds=x", "sample.seeds: expected a list, got 'x'"),
        ("output.keep=all", "output.keep: expected an integer, got 'all'"),
        ("log.every=often", "log.every: expected an integer, got 'often'"),
        ("log.to=tensorboard", "log.to: expected a list, got 'tensorboard'"),
        ("dreambooth.instance_dir=[1]", "dreambooth.instance_dir: expected a string"),
    ],
)
def test_every_section_rejects_a_wrong_type(tmp_path, override, expected):
    raw = {
        **MINIMAL,
        "dreambooth": {
            "instance_dir": "x",
            "instance_prompt": "a sks dog",
            "class_prompt": "a dog",
        },
    }
    assert expected in error_of(write(tmp_path, raw), [override])

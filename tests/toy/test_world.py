import itertools

import numpy as np
import pytest

from tuner.toy import datasets, world


def _pixels(spec):
    return np.asarray(world.render(spec))


def test_same_seed_gives_identical_images_and_specs():
    a, b = world.generate(5, 12), world.generate(5, 12)
    assert [s for _, s in a] == [s for _, s in b]
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(a, b, strict=True))


def test_different_seeds_differ():
    a, b = world.generate(5, 12), world.generate(6, 12)
    assert [s for _, s in a] != [s for _, s in b]
    assert any(x.tobytes() != y.tobytes() for (x, _), (y, _) in zip(a, b, strict=True))


def test_images_are_64px_rgb():
    for image, _ in world.generate(0, 4, style=None, subject=None):
        assert image.size == (64, 64) and image.mode == "RGB"


@pytest.mark.parametrize(
    "field,values",
    [
        ("shape", world.SHAPES),
        ("style", world.STYLES),
    ],
)
def test_each_shape_and_style_renders_differently(field, values):
    base = world.Spec("star", "red", "white", size=40, cx=32, cy=32)
    images = {v: _pixels(world.Spec(**{**base.__dict__, field: v})) for v in values}
    for a, b in itertools.combinations(values, 2):
        assert not np.array_equal(images[a], images[b]), (a, b)


def test_each_subject_differs_from_its_plain_class_and_from_each_other():
    images = {}
    for name, subject in world.SUBJECTS.items():
        plain = world.Spec(subject.shape, subject.color, "green", size=40)
        images[name] = _pixels(
            world.Spec(subject.shape, subject.color, "green", "solid", name, size=40)
        )
        assert not np.array_equal(images[name], _pixels(plain)), name
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(images[a], images[b])


def test_shape_is_fully_inside_the_image():
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = world.mixed_spec(rng)
        px = _pixels(spec)
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        assert (border == world.COLORS[spec.background]).all(), spec
        assert (px == world.COLORS[spec.color]).all(axis=2).sum() > 30, spec


def test_constraints_are_honoured_and_background_never_matches_colour():
    for _, spec in world.generate(3, 50, shape="star", background=("blue", "white")):
        assert spec.shape == "star" and spec.background in ("blue", "white")
        assert spec.style == "solid" and spec.subject == "none"
    rng = np.random.default_rng(2)
    for _ in range(500):
        spec = world.mixed_spec(rng)
        assert spec.color != spec.background


def test_captions_match_specs():
    assert world.caption(world.Spec("circle", "red", "blue")) == "a red circle on a blue background"
    assert (
        world.caption(world.Spec("star", "orange", "white", "stripes"))
        == "an orange star on a white background, zebrastyle"
    )
    smiley = world.Spec("circle", "yellow", "blue", subject="smiley")
    assert world.caption(smiley) == "a sks circle on a blue background"
    assert (
        world.caption(world.Spec("cross", "red", "black"), with_color=False)
        == "a cross on a black background"
    )
    rng = np.random.default_rng(4)
    for _ in range(200):
        spec = world.mixed_spec(rng)
        words = world.caption(spec).replace(",", "").split()
        assert spec.shape in words and spec.background in words
        assert set(words) <= set(world.VOCABULARY)
        if spec.subject == "none":
            assert spec.color in words
        else:
            assert world.SUBJECTS[spec.subject].token in words
        triggers = set(world.STYLE_TRIGGERS.values()) & set(words)
        assert triggers == ({world.STYLE_TRIGGERS[spec.style]} if spec.style != "solid" else set())


def _read_tree(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dataset_rendering_is_deterministic(tmp_path):
    datasets.render_datasets(tmp_path / "a")
    datasets.render_datasets(tmp_path / "b")
    a, b = _read_tree(tmp_path / "a"), _read_tree(tmp_path / "b")
    assert a == b
    assert sum(name.startswith("toy-stripes/") and name.endswith(".png") for name in a) == 16
    assert sum(name.startswith("toy-outline/") and name.endswith(".png") for name in a) == 16
    assert sum(name.startswith("toy-subject/") and name.endswith(".txt") for name in a) == 8
    assert b"zebrastyle" in a["toy-stripes/000.txt"]
    assert b"hollowstyle" in a["toy-outline/000.txt"]
    assert a["toy-subject/000.txt"].startswith(b"a sks circle")


def test_committed_datasets_match_the_generator(tmp_path):
    from pathlib import Path

    repo_datasets = Path(__file__).resolve().parents[2] / "datasets"
    datasets.render_datasets(tmp_path)
    names = (datasets.OUTLINE_DATASET, datasets.STRIPES_DATASET, datasets.SUBJECT_DATASET,
             datasets.SUBJECT_MASKS)  # fmt: skip
    for name in names:
        assert _read_tree(repo_datasets / name) == _read_tree(tmp_path / name), (
            f"datasets/{name} is stale: run python -m tuner.toy.world render-datasets datasets/"
        )

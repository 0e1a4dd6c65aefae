"""Paired (reference, target) data: partners found by stem or by a metadata column, bad pairs
named and skipped, a set with no pair stops before any model loads, flip and random crop are
the same for both images, and the reference latents are cached beside the targets'."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner.data.cache import CachePlan, TensorCache
from tuner.data.dataset import TrainDataset, collate
from tuner.data.images import load_image
from tuner.data.items import collect_items, prepare_controls
from tuner.errors import TunerError
from tuner.recipe import DataSection

REPO = Path(__file__).resolve().parents[2]
HOLLOW = REPO / "datasets" / "toy-hollow"


def paired_copy(tmp_path: Path, count: int = 3) -> tuple[Path, Path]:
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    targets.mkdir()
    controls.mkdir()
    for index in range(count):
        stem = f"{index:03d}"
        shutil.copy(HOLLOW / "targets" / f"{stem}.png", targets / f"{stem}.png")
        shutil.copy(HOLLOW / "targets" / f"{stem}.txt", targets / f"{stem}.txt")
        shutil.copy(HOLLOW / "controls" / f"{stem}.png", controls / f"{stem}.png")
    return targets, controls


def data(**entry) -> DataSection:
    return DataSection(datasets=[entry], resolution=64)


def test_missing_and_unreadable_partners_are_named_and_skipped(tmp_path, caplog):
    targets, controls = paired_copy(tmp_path)
    (controls / "001.png").unlink()
    (controls / "002.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="tuner"):
        items, report = collect_items(data(path=str(targets), control_dir=str(controls)))
    assert [Path(i.record.image).name for i in items] == ["000.png"]
    assert [Path(name).name for name in report.skipped] == ["001.png", "002.png"]
    assert "001.png: no control image" in caplog.text
    assert "002.png: unreadable control image" in caplog.text
    assert len(items[0].controls) == 1


def test_no_usable_pair_stops(tmp_path):
    targets, controls = paired_copy(tmp_path, count=1)
    (controls / "000.png").unlink()
    with pytest.raises(TunerError, match="no usable \\(target, control\\) pair"):
        collect_items(data(path=str(targets), control_dir=str(controls)))


def test_control_column_of_a_metadata_file(tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(HOLLOW / "targets", folder, ignore=shutil.ignore_patterns("*.txt"))
    shutil.copytree(HOLLOW / "controls", tmp_path / "refs")
    rows = [
        {"file_name": f"{i:03d}.png", "text": "make it hollow", "control": f"../refs/{i:03d}.png"}
        for i in range(8)
    ]
    rows[3]["control"] = "../refs/missing.png"
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items, report = collect_items(data(path=str(folder), control_column="control"))
    assert len(items) == 7 and len(report.skipped) == 1
    by_folder, _ = collect_items(
        data(path=str(HOLLOW / "targets"), control_dir=str(HOLLOW / "controls"))
    )
    # the same pairs, whichever way they are named
    assert {i.controls[0].image_hash for i in items} < {i.controls[0].image_hash for i in by_folder}


def test_flip_and_random_crop_are_the_same_for_both(tmp_path):
    """A reference identical to its target must come out identical, crop and flip included."""
    targets, controls = paired_copy(tmp_path)
    for target in targets.glob("*.png"):
        shutil.copy(target, controls / target.name)
    section = DataSection(
        datasets=[{"path": str(targets), "control_dir": str(controls)}],
        resolution=48,  # smaller than the 64 px images: a real crop window
        crop="random",
        flip=True,
    )
    items, _ = collect_items(section)
    dataset = TrainDataset(items, section, CachePlan(None, None, "x", "random"), seed=3)
    flipped = 0
    for position in range(8):
        sample = dataset[(position % len(items), 0, position)][0]
        target, control = sample["pixels"], sample["control_pixels"][0]
        np.testing.assert_array_equal(control.numpy(), target.numpy())
        flipped += not torch.equal(target, torch.flip(target, dims=[2]))
    batch = collate([dataset[(0, 0, 0)], dataset[(1, 0, 1)]])
    assert batch["control_pixels"][0].shape == batch["pixels"].shape
    assert flipped  # the check is not vacuous: asymmetric crops were compared


def test_reference_latents_are_cached_beside_the_targets(tmp_path, monkeypatch):
    from tuner import families
    from tuner.data.cache import build_cache
    from tuner.recipe import ModelSection

    targets, controls = paired_copy(tmp_path)
    section = DataSection(
        datasets=[{"path": str(targets), "control_dir": str(controls)}], resolution=32, flip=True
    )
    items, _ = collect_items(section)
    family = families.get("flux-kontext")
    comps = family.load(ModelSection(path="builtin:tiny-flux-kontext"), torch.float32)
    plan = CachePlan(TensorCache(tmp_path / "c", "latents"), None, "id", "center")
    first = build_cache(items, section, plan, family, comps, "cpu")
    assert first == {"hit": 0, "made": 12}  # 3 targets + 3 references, each flipped or not
    second = build_cache(items, section, plan, family, comps, "cpu")
    assert second == {"hit": 12, "made": 0}
    sample = TrainDataset(items, section, plan, seed=0)[(0, 0, 0)][0]
    pixels = prepare_controls(items[0], "center", False, None)[0][None]
    with torch.no_grad():  # the reference's own latent (the cache encodes in batches)
        plain, flipped = family.encode_controls(comps, torch.cat([pixels, pixels.flip(3)]))
    got = sample["control_latents"][0]
    assert min((got - plain).abs().max(), (got - flipped).abs().max()) < 1e-5
    # content-hashed: a changed reference makes exactly its own two entries again
    from PIL import Image

    Image.open(controls / "001.png").transpose(Image.Transpose.ROTATE_90).save(controls / "001.png")
    items, _ = collect_items(section)
    assert build_cache(items, section, plan, family, comps, "cpu") == {"hit": 10, "made": 2}


def test_control_column_of_a_saved_hf_dataset_with_several_references(tmp_path):
    """A list of images per row (multi-reference models): every reference is kept, in order."""
    import datasets

    targets = sorted((HOLLOW / "targets").glob("*.png"))[:2]
    controls = sorted((HOLLOW / "controls").glob("*.png"))[:3]
    table = datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in targets],
            "text": ["make it hollow"] * 2,
            "refs": [[str(controls[0]), str(controls[1])], [str(controls[2]), str(controls[0])]],
        },
        features=datasets.Features(
            image=datasets.Image(), text=datasets.Value("string"),
            refs=datasets.Sequence(datasets.Image()),
        ),
    )  # fmt: skip
    table.save_to_disk(str(tmp_path / "saved"))
    items, _ = collect_items(data(path=str(tmp_path / "saved"), control_column="refs"))
    decoded = [load_image(p.image).tobytes() for item in items for p in item.controls]
    expected = [
        load_image(c).tobytes() for c in (controls[0], controls[1], controls[2], controls[0])
    ]
    assert [len(item.controls) for item in items] == [2, 2]
    assert decoded == expected

"""collect_items: repeats, per-dataset prefix/resolution, caption fallbacks."""

from __future__ import annotations

from tuner.data.items import collect_items
from tuner.recipe import DataSection


def test_repeats_prefix_and_per_dataset_resolution(style_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    first = sorted(style_dir.glob("*.png"))[0]
    (other / "x.png").write_bytes(first.read_bytes())  # no caption file: default_caption
    data = DataSection(
        resolution=64,
        datasets=[
            {"path": str(style_dir), "repeats": 3, "prefix": "zebrastyle"},
            {
                "path": str(other),
                "repeats": 2,
                "resolution": 32,
                "default_caption": "a thing",
                "suffix": "sharp",
            },
        ],
    )
    items, report = collect_items(data)
    assert len(items) == 4 * 3 + 1 * 2
    assert sum(1 for i in items if i.size == (64, 64)) == 12
    assert sum(1 for i in items if i.size == (32, 32)) == 2
    assert all(i.caption.startswith("zebrastyle, ") for i in items if i.size == (64, 64))
    assert {i.caption for i in items if i.size == (32, 32)} == {"a thing, sharp"}
    assert "64x64: 12 images" in report.histogram and "32x32: 2 images" in report.histogram

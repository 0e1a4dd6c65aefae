import io
import json

import pytest
from PIL import Image

from tuner.data.images import load_image
from tuner.data.sources import Record, list_records
from tuner.errors import TunerError


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path_factory, monkeypatch):
    # Keep `datasets` from writing caches into the real home directory, and outside the
    # image folders (its imagefolder builder scans those).
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))


def save(path, size=(16, 16), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size, color=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_with_sidecars_recursive_sorted(tmp_path):
    root = tmp_path / "set"
    save(root / "b.png")
    (root / "b.txt").write_text("  a dog, grass \n", encoding="utf-8")
    save(root / "a.JPG")
    save(root / "sub" / "c.webp")
    (root / "sub" / "c.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9 \xff")  # BOM + invalid utf-8
    (root / "notes.md").write_text("not an image")
    save(root / "._b.png")  # macOS resource fork junk
    save(root / ".cache" / "x.png")

    records = list_records(str(root), source=2)
    names = [r.key.rsplit("/", 2)[-2:] for r in records]
    assert names == [["set", "a.JPG"], ["set", "b.png"], ["sub", "c.webp"]]
    assert [r.caption for r in records] == [None, "a dog, grass", "caf\ufffd \ufffd"]
    assert all(r.source == 2 and r.image == r.key for r in records)
    assert load_image(records[1].image).size == (16, 16)
    assert list_records(str(root), source=2) == records


def test_custom_caption_ext(tmp_path):
    save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("wrong")
    (tmp_path / "x.caption").write_text("right")
    assert list_records(str(tmp_path), source=0, caption_ext=".caption")[0].caption == "right"
    assert list_records(str(tmp_path), source=0, caption_ext="caption")[0].caption == "right"
    assert list_records(str(tmp_path), source=0)[0].caption == "wrong"


def test_empty_folder_is_not_an_error(tmp_path):
    assert list_records(str(tmp_path), source=0) == []


def test_metadata_jsonl(tmp_path):
    save(tmp_path / "imgs" / "1.png")
    save(tmp_path / "2.png")
    rows = [{"file_name": "imgs/1.png", "text": "one"}, {"file_name": "2.png", "text": "two"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    records = list_records(str(tmp_path), source=1)
    assert [r.caption for r in records] == ["one", "two"]
    assert records[0].image.endswith("imgs/1.png")
    assert load_image(records[1].image).size == (16, 16)

    with pytest.raises(TunerError, match=r"no caption column 'label'.*image, text"):
        list_records(str(tmp_path), source=1, caption_column="label")


def test_metadata_csv_with_explicit_column(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,prompt,tags\na.png,"a cat, sitting",x\nb.png,a dog,y\n', encoding="utf-8"
    )
    assert [r.caption for r in list_records(str(tmp_path), source=0)] == [
        "a cat, sitting",
        "a dog",
    ]
    tags = list_records(str(tmp_path), source=0, caption_column="tags")
    assert [r.caption for r in tags] == ["x", "y"]


def _hf_dataset(n=3):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = {
        "image": [Image.new("RGB", (16 + 8 * i, 16), (i * 40, 0, 0)) for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
    }
    return datasets.Dataset.from_dict(data, features=features)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    _hf_dataset().save_to_disk(str(tmp_path / "ds"))
    records = list_records(str(tmp_path / "ds"), source=4)
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 2"]
    assert [r.key for r in records] == [f"{tmp_path / 'ds'}:{i}" for i in range(3)]
    assert all(isinstance(r.image, bytes) and r.source == 4 for r in records)
    assert load_image(records[2].image).size == (32, 16)

    dd = datasets.DatasetDict({"train": _hf_dataset(1), "validation": _hf_dataset(2)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(list_records(str(tmp_path / "dd"), source=0)) == 1
    assert len(list_records(str(tmp_path / "dd"), source=0, split="validation")) == 2
    with pytest.raises(TunerError, match="no split 'test'"):
        list_records(str(tmp_path / "dd"), source=0, split="test")


def test_parquet_written_with_datasets(tmp_path):
    path = tmp_path / "data.parquet"
    _hf_dataset(2).to_parquet(str(path))
    records = list_records(str(path), source=0)
    assert [r.caption for r in records] == ["caption 0", "caption 1"]
    assert load_image(records[1].image).size == (24, 16)
    with pytest.raises(TunerError, match="no image column 'photo'"):
        list_records(str(path), source=0, image_column="photo")


def test_parquet_plain_struct_column_with_override(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pics = [{"bytes": png_bytes((20, 12)), "path": "nowhere/a.png"}]
    table = pa.table({"picture": pics, "prompt": ["sks dog"], "other": [1]})
    path = tmp_path / "plain.parquet"
    pq.write_table(table, path)

    with pytest.raises(TunerError, match="cannot find an image column"):
        list_records(str(path), source=0)
    (record,) = list_records(str(path), source=3, image_column="picture")
    assert record.caption == "sks dog" and record.source == 3
    assert load_image(record.image).size == (20, 12)


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(TunerError, match="dataset path not found"):
        list_records(str(tmp_path / "nope"), source=0)
    with pytest.raises(TunerError, match="dataset path not found"):
        list_records("./does/not/exist", source=0)
    (tmp_path / "x.zip").write_bytes(b"zip")
    with pytest.raises(TunerError, match="unsupported dataset file"):
        list_records(str(tmp_path / "x.zip"), source=0)


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return _hf_dataset(1)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (record,) = list_records("someorg/some-set", source=0, split="train")
    assert calls == [("someorg/some-set", "train")]
    assert record.key == "someorg/some-set:0" and record.caption == "caption 0"

    def failing_load(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(TunerError, match="Hugging Face Hub failed"):
        list_records("someorg/other", source=0)


def test_record_fields():
    r = Record(image=b"x", key="k", caption=None, source=0)
    assert (r.image, r.key, r.caption, r.source) == (b"x", "k", None, 0)

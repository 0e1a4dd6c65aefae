"""Turn one `data.datasets[i].path` into a list of Records (image + caption), whatever
the on-disk layout: kohya-style folder with sidecar captions, HF imagefolder with
metadata.jsonl/.csv, a parquet file, a `save_to_disk` folder, or a Hub dataset name."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.data.images import IMAGE_EXTS
from tuner.errors import TunerError

CAPTION_COLUMNS = ("caption", "text", "prompt")
IMAGE_COLUMNS = ("image", "img")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
log = logging.getLogger("tuner")


@dataclass
class Record:
    """One training example before decoding. `image` is a file path, or encoded image
    bytes for images embedded in a dataset; `key` identifies it stably across runs."""

    image: str | bytes
    key: str
    caption: str | None
    source: int
    controls: tuple = ()  # partner images (paths, bytes, or pairs.MISSING), editing data only


def list_records(
    path: str,
    *,
    source: int,
    caption_ext: str = ".txt",
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str = "train",
    skip_dirs: Mapping[str, str] | None = None,
    control_dir: str | None = None,
    control_column: str | None = None,
) -> list[Record]:
    """Records for one dataset entry, in a deterministic order. May be empty.

    skip_dirs: folders (path -> what they are, e.g. "the output.dir") whose files are never
    training data even when they lie inside a dataset folder. control_dir / control_column:
    where each record's reference images are (data/pairs.py)."""
    path = os.fspath(path)
    if control_dir:
        return _with_partner_files(path, source, caption_ext, dict(skip_dirs or {}), control_dir)
    columns = (caption_column, image_column, control_column)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in _SAVED_DATASET_MARKERS):
            return _from_saved_dataset(path, source, *columns, split)
        for name in _METADATA_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return _from_metadata(path, name, source, caption_column, control_column)
        if control_column:
            raise TunerError(
                f"{path}: control_column needs a metadata.jsonl/csv or an HF dataset; for a "
                "folder of images use data.datasets[].control_dir"
            )
        return _from_folder(path, source, caption_ext, skip_dirs or {})
    if os.path.isfile(path):
        if path.lower().endswith(".parquet"):
            return _from_parquet(path, source, *columns)
        raise TunerError(f"{path}: unsupported dataset file; use a folder or a .parquet file")
    if _HUB_NAME.match(path):
        return _from_hub(path, source, *columns, split)
    raise TunerError(f"{path}: dataset path not found; check data.datasets[..].path")


# --- paired data ---------------------------------------------------------------------


def _with_partner_files(
    path: str, source: int, caption_ext: str, skip_dirs: dict, control_dir: str
) -> list[Record]:
    from tuner.data.pairs import partner_in

    if not os.path.isdir(path) or not os.path.isdir(control_dir):
        missing = path if not os.path.isdir(path) else control_dir
        raise TunerError(
            f"{missing}: not a folder; data.datasets[].control_dir pairs two folders of "
            "same-stem images"
        )
    skip_dirs[control_dir] = "the control_dir"  # references are not training targets
    records = _from_folder(path, source, caption_ext, skip_dirs)
    for record in records:
        record.controls = (partner_in(control_dir, record.image, path),)
    return records


# --- folders ----------------------------------------------------------------------


def _from_folder(
    root: str, source: int, caption_ext: str, skip_dirs: Mapping[str, str]
) -> list[Record]:
    records = []
    for image_path in _walk_images(root, skip_dirs):
        caption = _read_sidecar(image_path, caption_ext)
        records.append(Record(image=image_path, key=image_path, caption=caption, source=source))
    return records


# Image types Pillow may open but tuner does not train on (animated, layered, HDR, camera raw):
# counted and named in one warning, never skipped silently.
SKIPPED_IMAGE_EXTS = (
    ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".ico",
    ".jp2", ".exr", ".hdr", ".dng", ".cr2", ".nef", ".arw",
)  # fmt: skip


def _walk_images(root: str, skip_dirs: Mapping[str, str] | None = None) -> list[str]:
    """Image files under root, recursively, sorted by relative path. Hidden files and
    folders are skipped (macOS '._x.jpg' forks, .ipynb_checkpoints, .cache...), and so are
    the skip_dirs (each with one line saying so). Symlinked folders are read (each real
    folder once); unsupported image types are named in a warning."""
    given, root = root, os.path.abspath(root)
    skip = {os.path.realpath(p): (p, why) for p, why in (skip_dirs or {}).items()}
    found, skipped, seen = [], Counter(), set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            skipped_dir = skip.get(os.path.realpath(os.path.join(folder, d)))
            if skipped_dir:
                log.warning(
                    "%s: skipping %s (%s): its files are not training data", given, *skipped_dir
                )
                continue
            kept.append(d)
        dirs[:] = kept
        for name in files:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTS:
                found.append(os.path.join(folder, name))
            elif ext in SKIPPED_IMAGE_EXTS:
                skipped[ext] += 1
    if skipped:
        kinds = ", ".join(f"{count} {ext}" for ext, count in sorted(skipped.items()))
        log.warning(
            "%s: skipped %d files of unsupported image types (%s); convert them to png or "
            "jpg to train on them",
            root,
            sum(skipped.values()),
            kinds,
        )
    # Sort on '/'-joined relative parts so order doesn't depend on os.walk or OS.
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _read_sidecar(image_path: str, caption_ext: str) -> str | None:
    ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    sidecar = os.path.splitext(image_path)[0] + ext
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        log.warning("caption %s is not UTF-8 (odd bytes read as U+FFFD); save it as UTF-8", sidecar)
    # Windows editors often prepend a BOM, which would end up in the prompt.
    return text.lstrip("\ufeff").strip()


def _from_metadata(
    root: str, name: str, source: int, caption_column: str | None, control_column: str | None
) -> list[Record]:
    """HF imagefolder layout (`file_name` + a caption column in metadata.jsonl/csv), read by
    `datasets` itself through its `imagefolder` builder."""
    import datasets

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=os.path.abspath(root), split="train")
    except Exception as e:  # malformed metadata, rows naming missing files, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TunerError(
            f"{os.path.join(root, name)}: not a readable HF imagefolder ({first}); each row "
            "needs a file_name next to the images and a caption column"
        ) from e
    return _from_hf(ds, root, source, caption_column, None, control_column, root)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TunerError(f"{path}:{number}: invalid JSON ({e.msg}); fix that line") from e
    return rows


def _read_csv(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


# --- Hugging Face datasets -----------------------------------------------------------


def _from_parquet(
    path: str, source: int, caption_column: str | None, image_column: str | None, control_column
) -> list[Record]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[os.path.abspath(path)], split="train")
    return _from_hf(ds, path, source, caption_column, image_column, control_column)


def _from_saved_dataset(
    path: str, source: int, caption_column, image_column, control_column, split: str
) -> list[Record]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TunerError(
                f"{path}: no split '{split}' (splits: {', '.join(ds)}); set data.datasets[..].split"
            )
        ds = ds[split]
    return _from_hf(ds, path, source, caption_column, image_column, control_column)


def _from_hub(
    name: str, source: int, caption_column, image_column, control_column, split: str
) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing split: all surface the same way
        raise TunerError(
            f"{name}: not a local path, and loading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}); check data.datasets[..].path"
        ) from e
    return _from_hf(ds, name, source, caption_column, image_column, control_column)


def _from_hf(
    ds: Any,
    name: str,
    source: int,
    caption_column: str | None,
    image_column: str | None,
    control_column: str | None = None,
    root: str | None = None,
) -> list[Record]:
    import datasets
    from tuner.data.pairs import column_partners

    columns = list(ds.column_names)
    image_col = _image_column(ds.features, image_column, name)
    caption_col = _caption_column(columns, caption_column, name)
    if control_column is not None and control_column not in columns:
        raise TunerError(
            f"{name}: no control column '{control_column}' (columns: {', '.join(columns)}); "
            "fix data.datasets[..].control_column"
        )
    ds = ds.select_columns([c for c in (image_col, caption_col, control_column) if c])
    for column in (image_col, control_column):
        if column and isinstance(ds.features[column], datasets.Image):
            # Skip decoding: we only want the encoded bytes (or path) for the Record.
            ds = ds.cast_column(column, datasets.Image(decode=False))
    if root is None:
        root = name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name))

    records = []
    for row_index, row in enumerate(ds):
        image = _image_value(row[image_col], f"{name} row {row_index}")
        caption = _as_caption(row[caption_col]) if caption_col else None
        key = f"{name}:{row_index}"
        controls = column_partners(row[control_column], root) if control_column else ()
        records.append(Record(image, key, caption, source, controls))
    return records


def _image_column(features: Any, requested: str | None, name: str) -> str:
    import datasets

    columns = list(features)
    if requested is not None:
        if requested not in columns:
            raise TunerError(
                f"{name}: no image column '{requested}' (columns: {', '.join(columns)}); "
                "fix data.datasets[..].image_column"
            )
        return requested
    typed = [c for c in columns if isinstance(features[c], datasets.Image)]
    named = [c for c in columns if c.lower() in IMAGE_COLUMNS]
    if typed or named:
        return (typed or named)[0]
    raise TunerError(
        f"{name}: cannot find an image column (columns: {', '.join(columns)}); "
        "set data.datasets[..].image_column"
    )


def _caption_column(columns: list[str], requested: str | None, name: str) -> str | None:
    """The requested column (must exist), else the first of CAPTION_COLUMNS present,
    else None: a dataset without captions is allowed (e.g. DreamBooth with a prefix)."""
    if requested is not None:
        if requested not in columns:
            raise TunerError(
                f"{name}: no caption column '{requested}' (columns: {', '.join(columns)}); "
                "fix data.datasets[..].caption_column"
            )
        return requested
    lowered = {c.lower(): c for c in columns}
    for candidate in CAPTION_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    return None


def _image_value(value: Any, where: str) -> str | bytes:
    """Normalize an HF image cell to bytes or an existing path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        if path and os.path.isfile(path):
            return os.path.abspath(path)
        raise TunerError(f"{where}: image cell has no bytes and no readable path ({path!r})")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and os.path.isfile(value):
        return os.path.abspath(value)
    if hasattr(value, "save"):  # a decoded PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TunerError(f"{where}: unsupported image value of type {type(value).__name__}")


def _as_caption(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        # Some datasets store several captions per image; use the first non-empty one.
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if value is None:
            return None
    return str(value).strip()

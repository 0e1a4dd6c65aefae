"""The one way tuner writes a file or a folder: into a temporary name beside the target, then
renamed into place, so a reader never sees a half-written file and a failed write leaves
nothing behind.

Every failure to write (OSError, safetensors' SafetensorError, torch.save's RuntimeError on a
full disk) becomes one WriteError line naming the path and the reason. Files get the user's
umask (0644 for most), not safetensors' 0600: a ComfyUI or webui running as another user must
be able to read an adapter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tuner.errors import TunerError

_COUNTER = itertools.count()


class WriteError(TunerError):
    """A file or folder could not be written; `path` and `reason` say which and why."""

    def __init__(self, path: Path, reason: str, hint: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"could not write {path} ({reason}){'; ' + hint if hint else ''}")


def is_write_failure(exc: BaseException) -> bool:
    """Errors that mean "the bytes did not reach the disk" rather than a bug in the caller."""
    if isinstance(exc, (OSError, RuntimeError)):
        return True  # torch.save raises RuntimeError ("unexpected pos ...") on a full disk
    return type(exc).__name__ == "SafetensorError"


def reason_of(exc: BaseException, near: Path | None = None) -> str:
    """A short reason: 'No space left on device', 'Permission denied', ..."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    match = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors
    if match:
        return match.group(1)
    if near is not None and disk_full(near):
        return "No space left on device"
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text.strip())  # torch.save
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def disk_full(path: Path) -> bool:
    """True when the filesystem holding path (or its nearest existing parent) is full."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 1 << 20


def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _file_mode() -> int:
    return 0o666 & ~umask()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_COUNTER)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def write_file(path: Path, write: Callable[[Path], None], *, hint: str = "", durable=False) -> Path:
    """write(tmp) writes the whole file at tmp; tmp is then renamed to path. Any write failure
    removes tmp and raises one WriteError; other errors (bugs) propagate after the cleanup."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, _file_mode())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, Exception) and is_write_failure(exc):
            raise WriteError(path, reason_of(exc, path.parent), hint) from exc
        raise
    return path


@contextlib.contextmanager
def write_folder(path: Path, *, hint: str = "", replace: bool = True) -> Iterator[Path]:
    """`with write_folder(final) as tmp:` fill tmp; on success every file in it gets the user's
    mode, is made durable, and tmp is renamed to final (replacing it when `replace`)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        _remove(tmp)  # left by an earlier interrupted write of the same folder
        tmp.mkdir(parents=True)
        yield tmp
        mode = _file_mode()
        for item in tmp.rglob("*"):
            if item.is_file():
                os.chmod(item, mode)
                _fsync(item)
        if path.exists() and replace:
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, Exception) and is_write_failure(exc):
            raise WriteError(path, reason_of(exc, path.parent), hint) from exc
        raise


def write_text(path: Path, text: str, **kwargs) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **kwargs)


def write_json(path: Path, value, **kwargs) -> Path:
    return write_text(path, json.dumps(value, indent=2), **kwargs)


def save_image(image, path: Path, **save_kwargs) -> Path:
    """A PIL image, atomically (the format from path's suffix unless given)."""
    path = Path(path)
    fmt = save_kwargs.pop("format", None) or path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return write_file(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None, **kwargs) -> Path:
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in metadata.items()} if metadata else None
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), **kwargs)


def torch_save(value, path: Path, **kwargs) -> Path:
    import torch

    return write_file(path, lambda tmp: torch.save(value, tmp), **kwargs)


def _fsync(path: Path) -> None:
    # The bytes must be durable before a rename publishes them (a crash right after a rename
    # must not leave a "complete" file that is empty).
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())

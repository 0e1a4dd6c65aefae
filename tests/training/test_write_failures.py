"""Full disks and write failures: every write goes through tuner.files, so any failure (OSError,
safetensors' SafetensorError, torch.save's RuntimeError) is one line, leaves no temp file, and
the trained weights are never lost to a failed final write. Files get the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError

from tuner.cli import main
from tuner.training import checkpoint
from tuner.training.outputs import FINISHED

ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def enospc_oserror(tmp):
    raise OSError(28, "No space left on device")


def enospc_safetensors(tmp):
    Path(tmp).write_bytes(b"half")  # what a full disk leaves: a partial temp file
    raise SafetensorError(ENOSPC)


def enospc_torch_save(tmp):
    Path(tmp).write_bytes(b"half")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def permission(tmp):
    raise PermissionError(13, "Permission denied")


# writer -> the reason in the one line (torch.save's own message says nothing; the full disk is
# found from the free space, which a test cannot fake, so its message is kept)
CASES = [
    ("OSError ENOSPC", enospc_oserror, "No space left on device"),
    ("SafetensorError ENOSPC", enospc_safetensors, "No space left on device"),
    ("torch.save RuntimeError", enospc_torch_save, "unexpected pos 576 vs 534"),
    ("permission", permission, "Permission denied"),
]


@pytest.mark.parametrize("case, writer, reason", CASES, ids=[c[0] for c in CASES])
def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, case, writer, reason):
    from tuner import files

    target = tmp_path / "sub" / "file.bin"
    with pytest.raises(files.WriteError) as info:
        files.write_file(target, writer)
    assert str(info.value) == f"could not write {target} ({reason})"
    assert list((tmp_path / "sub").iterdir()) == []  # no temp file, no target


def test_a_failed_folder_write_leaves_no_tmp_folder(tmp_path):
    from tuner import files

    final = tmp_path / "checkpoints" / "step-000004"
    with (
        pytest.raises(files.WriteError, match=r"No space left on device"),
        files.write_folder(final) as tmp,
    ):
        enospc_safetensors(tmp / "a.safetensors")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def recipe_file(tmp_path, style_dir, **output) -> Path:
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {
            "datasets": [{"path": str(style_dir)}],
            "resolution": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3},
        "sample": {"prompts": []},
        "output": {"dir": str(tmp_path / "out"), **output},
        "log": {"every": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def failing_save_file(monkeypatch, fail_when):
    """safetensors.torch.save_file raising SafetensorError (ENOSPC) whenever fail_when(path)."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if fail_when(str(filename)):
            Path(filename).write_bytes(b"half")
            raise SafetensorError(ENOSPC)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".saving-")]


def test_checkpoint_safetensors_enospc_is_the_documented_line(
    tmp_path, style_dir, capsys, monkeypatch
):
    """Before: SafetensorError is no OSError, so a traceback and a .tmp-step-* folder."""
    monkeypatch.setenv("TUNER_RESCUE_DIR", str(tmp_path / "rescue-is-full-too"))
    failing_save_file(monkeypatch, lambda name: "step-" in name)
    assert main(["train", str(recipe_file(tmp_path, style_dir, save_every=2))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "error: could not save checkpoint step-000002 (No space left on device); none saved "
        "yet; free space and resume with train.resume=latest"
    ), last
    assert temp_files(tmp_path / "out") == []


def test_final_adapter_enospc_keeps_a_checkpoint_and_resume_finishes(
    tmp_path, style_dir, capsys, monkeypatch
):
    """save_every 0 (the default) and the final adapter write fails: before, the run was lost.
    Now a checkpoint of the last step is written, the line says so, and resuming only writes
    the outputs."""
    path = recipe_file(tmp_path, style_dir)
    failing_save_file(
        monkeypatch, lambda name: "step-" not in name and "pytorch_lora_weights" in name
    )
    assert main(["train", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: final outputs not complete: could not write ")
    assert "(No space left on device); checkpoint step-000003 holds the trained weights" in last
    assert last.endswith("train.resume=latest (it only writes the outputs)")
    out = tmp_path / "out"
    assert not (out / FINISHED).exists() and temp_files(out) == []
    saved = checkpoint.complete_checkpoints(out)
    assert [p.name for p in saved] == ["step-000003"]

    monkeypatch.undo()
    assert main(["train", str(path), "train.resume=latest"]) == 0
    assert (out / FINISHED).is_file()
    load = safetensors.torch.load_file
    from_checkpoint = load(str(saved[0] / "pytorch_lora_weights.safetensors"))
    final = load(str(out / "pytorch_lora_weights.safetensors"))
    assert from_checkpoint.keys() == final.keys()
    assert all(torch.equal(from_checkpoint[k], final[k]) for k in final)


def test_output_dir_full_the_weights_go_to_the_rescue_folder(
    tmp_path, style_dir, capsys, monkeypatch
):
    """Neither the final adapter nor a checkpoint fits in output.dir: a checkpoint goes to the
    rescue folder and the line gives the resume command for it."""
    rescue = tmp_path / "rescue"
    monkeypatch.setenv("TUNER_RESCUE_DIR", str(rescue))
    out = tmp_path / "out"
    failing_save_file(monkeypatch, lambda name: name.startswith(str(out)))
    path = recipe_file(tmp_path, style_dir)
    assert main(["train", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    saved = checkpoint.complete_checkpoints(checkpoint.rescue_dir(out))
    assert [p.name for p in saved] == ["step-000003"]
    assert str(saved[0]).startswith(str(rescue))
    assert f"the trained weights were saved to {saved[0]} instead" in last
    assert last.endswith(f"train.resume={saved[0]}")
    assert temp_files(out) == [] and not (out / FINISHED).exists()

    monkeypatch.undo()
    assert main(["train", str(path), f"train.resume={saved[0]}"]) == 0
    assert (out / FINISHED).is_file()


def test_written_files_follow_the_umask(tmp_path, style_dir):
    """Before: adapters, checkpoints and cache entries were 0600 (safetensors' default)."""
    old = os.umask(0o022)
    try:
        assert main(["train", str(recipe_file(tmp_path, style_dir, save_every=3))]) == 0
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name == "pytorch_lora_weights_kohya.safetensors" for p in written)
    assert any(p.name == "lora_state.safetensors" for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert {m for m in modes.values()} == {"0o644"}, modes

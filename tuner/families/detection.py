"""Which family a model belongs to, asked of every registered family's `Recognition`: from a
diffusers folder's model_index.json (and its denoiser config), a hub repo's configs, or a single
file's keys. Exactly one family must recognise a model."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from tuner.errors import TunerError
from tuner.families.loading import source_kind


def detect_family(path: str) -> str:
    from tuner import builtins

    kind = source_kind(path)
    if kind == "builtin":
        return builtins.lookup(builtins.builtin_name(path)).family
    if kind == "folder":
        return family_from_folder(Path(path).expanduser())
    if kind == "file":
        return family_from_file(Path(path).expanduser())
    return family_from_hub(path)


def family_from_index(pipeline: str, denoiser_config: Callable[[str], Mapping], where: str) -> str:
    """denoiser_config(subfolder) reads that component's config.json when a family asks."""
    from tuner.families import registry

    found = [
        name
        for name, cls in registry().items()
        if cls.spec.recognize.matches_index(
            pipeline, lambda s=cls.spec: denoiser_config(s.denoiser)
        )
    ]
    return _one(found, where, pipeline or "no pipeline class")


def family_from_folder(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text())

    def config(subfolder: str) -> Mapping:
        return json.loads((folder / subfolder / "config.json").read_text())

    return family_from_index(index.get("_class_name", ""), config, str(folder))


def family_from_hub(repo: str) -> str:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    try:
        index = DiffusionPipeline.load_config(repo)

        def config(subfolder: str) -> Mapping:
            # Any ConfigMixin reads a plain config.json; the UNet class is only the reader.
            return UNet2DConditionModel.load_config(repo, subfolder=subfolder)

        return family_from_index(index.get("_class_name", ""), config, repo)
    except TunerError:
        raise
    except Exception as exc:  # offline, private, or missing repo
        raise TunerError(
            f"model.path: could not read {repo} from the hub ({type(exc).__name__}); "
            "set model.family, or use a local folder"
        ) from exc


def family_from_file(file: Path) -> str:
    from tuner.families import registry

    if file.suffix != ".safetensors":
        raise TunerError(f"model.path: cannot detect the family of {file.name}; set model.family")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
    found = [name for name, cls in registry().items() if cls.spec.recognize.matches_keys(keys)]
    return _one(found, file.name, "its keys")


def _one(found: list[str], where: str, what: str) -> str:
    if len(found) == 1:
        return found[0]
    if not found:
        raise TunerError(
            f"model.path: cannot tell the family of {where} ({what}); set model.family"
        )
    raise TunerError(f"model.path: {where} could be any of {', '.join(found)}; set model.family")

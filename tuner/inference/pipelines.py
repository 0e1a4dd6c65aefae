"""Base pipelines with adapters loaded through diffusers' own loader, and cells rendered with
chosen adapter sets: what `tuner sample`, `tuner grid` and `tuner merge` share."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.inference.render import Cell, pipeline_modules, render_batch

log = logging.getLogger("tuner")


@dataclass
class LoraSpec:
    """One adapter file as the pipeline knows it."""

    path: Path
    scale: float
    name: str  # adapter name inside the pipeline (unique)
    label: str  # what grids and metadata call it


@dataclass
class AdapterChoice:
    """A set of adapters active together (one grid column, or all of `tuner sample --lora`)."""

    label: str
    loras: list[LoraSpec]
    step: int | None = None


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def adapter_file(path: str | Path) -> Path:
    """An output dir (its diffusers file, else its kohya file) or a .safetensors file."""
    from tuner.adapters.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME

    found = Path(path).expanduser()
    if found.is_dir():
        for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (found / name).is_file():
                return found / name
        raise TunerError(
            f"{path}: no {WEIGHT_NAME} or {KOHYA_WEIGHT_NAME} in this folder; give "
            "a training output dir or a .safetensors adapter file"
        )
    if found.is_file() and found.suffix == ".safetensors":
        return found
    raise TunerError(
        f"{path}: adapter not found; give a training output dir or a .safetensors "
        "adapter file (diffusers or kohya layout)"
    )


def lora_specs(texts: list[str]) -> list[LoraSpec]:
    specs = []
    for i, text in enumerate(texts):
        path, scale = parse_lora(text)
        file = adapter_file(path)
        label = Path(path).resolve().name if Path(path).is_dir() else file.stem
        if any(spec.label == label for spec in specs):
            label = f"{label}#{i + 1}"  # grid columns and the index need distinct labels
        specs.append(LoraSpec(file, scale, f"adapter{i}", label))
    return specs


def load_base(model_path: str, family_name: str | None = None, dtype=torch.float32):
    """(family, pipeline) for a hub id, folder, single file or builtin."""
    from tuner import families
    from tuner.recipe import ModelSection

    model = ModelSection(path=model_path, family=family_name)
    family = families.for_model(model)
    pipe = family.build_pipeline(family.load(model, dtype))
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def load_adapters(pipe, family, specs: list[LoraSpec]) -> None:
    """Each file through diffusers' own loader, under its own name; every LoRA module in the
    file must land on a layer (a silently dropped key is the classic 'lora key not loaded')."""
    from tuner.adapters import lycoris
    from tuner.adapters.formats import DOWN_KINDS, adapter_format, read_adapter

    loaded_names = {name for names in pipe.get_list_adapters().values() for name in names}
    for spec in specs:
        if spec.name in loaded_names:
            continue  # the same adapter in several grid columns, at other weights
        loaded_names.add(spec.name)
        state, metadata = read_adapter(spec.path)
        if lycoris.state_kind(state):
            # diffusers' pipeline loaders read no LoHa (and LoKr for a few pipelines only):
            # peft loads it onto the models, and checks every tensor lands on a layer.
            lycoris.load_into(pipe, family, state, metadata, spec.name)
            continue
        kind = adapter_format(state)
        with tempfile.TemporaryDirectory(prefix="tuner-lora-") as tmp:
            file = spec.path
            if kind == "kohya":
                file = kohya_file_as_diffusers(pipe, family, state, Path(tmp)) or file
            _load_lora_file(pipe, file, spec)
        kinds = ("lora_down",) if kind == "kohya" else DOWN_KINDS
        expected = sum(1 for key in state if any(f".{k}." in key for k in kinds))
        loaded = count_lora_layers(pipe, spec.name)
        if loaded < expected:  # more: a fused file module split into layers (FLUX.2 qkv)
            raise TunerError(
                f"{spec.path}: only {loaded} of {expected} LoRA modules matched "
                "layers of the base model; was it trained on another base model?"
            )
        # A layer can be created (from the file's LoraConfig) yet get no weights, when the
        # loader drops keys it does not recognise: its up weight then stays all zeros.
        ups = ("lora_up", "lora_B", "lora.up", "lora_linear_layer.up")
        nonzero = sum(
            1 for key, t in state.items() if any(f".{k}." in key for k in ups) and t.any()
        )
        filled = count_lora_layers(pipe, spec.name, nonzero=True)
        if filled < nonzero:
            raise TunerError(
                f"{spec.path}: the weights of {nonzero - filled} of {nonzero} LoRA modules "
                "did not load (the loader dropped their keys); re-export the file with "
                "`tuner export`"
            )


def _load_lora_file(pipe, file: Path, spec: LoraSpec) -> None:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # we raise one line instead
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=spec.name)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "size mismatch" in line), None)
        reason = "layer shapes differ" if reason else (lines or [type(exc).__name__])[0][:160]
        raise TunerError(
            f"{spec.path}: diffusers could not load this adapter into the base "
            f"model ({reason}); was it trained on another base model?"
        ) from exc
    finally:
        diffusers_logging.set_verbosity(level)


def kohya_file_as_diffusers(pipe, family, kohya: dict, folder: Path) -> Path | None:
    """A kohya file whose names are this model's layer names (what we write), converted by us
    into a diffusers file: exact per-module alphas (diffusers' kohya reader drops those for SD)
    and every family (diffusers reads kohya files for some pipelines only). None for other
    layouts (e.g. original-checkpoint names), which are left to diffusers' own converters."""
    from tuner.adapters.formats import kohya_names, kohya_scales_uniform, kohya_to_diffusers
    from tuner.adapters.lora import WEIGHT_NAME, write_diffusers_file

    names = kohya_names(family, family.components_from_pipeline(pipe, ""))
    if not all(key.split(".", 1)[0] in names for key in kohya):
        if not kohya_scales_uniform(kohya):
            log.warning(
                "this kohya file's modules have different alphas; diffusers' loader "
                "may scale some of them wrongly"
            )
        return None
    layers, configs = kohya_to_diffusers(kohya, names)
    return write_diffusers_file(folder, family, layers, configs, WEIGHT_NAME)


def count_lora_layers(pipe, adapter_name: str, nonzero: bool = False) -> int:
    """LoRA layers holding this adapter (nonzero: only those whose up weight is not zero)."""
    from peft.tuners.lora import LoraLayer

    return sum(
        1
        for module in pipeline_modules(pipe)
        for layer in module.modules()
        if isinstance(layer, LoraLayer)
        and adapter_name in layer.lora_A
        and (not nonzero or bool(layer.lora_B[adapter_name].weight.any()))
    )


def activate(pipe, choice: AdapterChoice) -> None:
    if choice.loras:
        pipe.set_adapters(
            [s.name for s in choice.loras], adapter_weights=[s.scale for s in choice.loras]
        )


def render_cells(
    pipe, cells: list[Cell], choices: dict[str, AdapterChoice], *, batch_size: int = 4, **settings
) -> None:
    """Fill every cell's image; cells with the same adapters and scale share pipeline calls.
    A cell's scale multiplies the weight of each of its adapters (0 = the base model)."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.adapter, cell.scale), []).append(cell)
    for (adapter, _), group in groups.items():
        activate(pipe, choices[adapter])
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            for cell, image in zip(chunk, render_batch(pipe, chunk, **settings), strict=True):
                cell.image = image


def grid_cells(
    prompts: list[str], seeds: list[int], scales: list[float], choices: dict[str, AdapterChoice]
) -> list[Cell]:
    return [
        Cell(prompt, seed, scale, choice.step, label)
        for label, choice in choices.items()
        for prompt in prompts
        for seed in seeds
        for scale in scales
    ]

"""Adapter file formats: diffusers <-> kohya/webui names, and safetensors metadata.

Why by hand: diffusers' convert_state_dict_to_kohya writes alpha = rank (losing a trained alpha)
and names the SD1.x text encoder `lora_te1`; A1111/ComfyUI expect `lora_te` there. The mapping is
plain renaming, so we keep it here, small and tested against diffusers' own kohya loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.errors import TunerError

DIFFUSERS_LORA = re.compile(
    r"^(?P<component>[a-z_0-9]+?)\.(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$"
)
KOHYA_LORA = re.compile(r"^(?P<prefix>lora_[a-z0-9]+?)_(?P<module>.+)\.(?P<kind>lora_down|lora_up|"
                        r"alpha)(?:\.weight)?$")


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise TunerError(f"{path}: adapter file not found; give an output dir or a .safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def alphas_from_metadata(metadata: dict[str, str]) -> dict[str, float]:
    """Component name -> lora_alpha, from diffusers' `lora_adapter_metadata`."""
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    alphas = {}
    for key, value in raw.items():
        component, _, field = key.partition(".")
        if field == "lora_alpha":
            alphas[component] = float(value)
    return alphas


def to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str],
             prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA -> kohya names with `.alpha` tensors."""
    alphas = alphas_from_metadata(metadata)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = DIFFUSERS_LORA.match(key)
        if match is None:
            raise TunerError(f"cannot convert key {key!r} to kohya (DoRA and LoHa/LoKr adapters "
                             "have no kohya layout here); export the diffusers format instead")
        component = match["component"]
        if component not in prefixes:
            raise TunerError(f"no kohya prefix for component {component!r}")
        base = f"{prefixes[component]}_{match['module'].replace('.', '_')}"
        down = match["kind"] in ("lora.down", "lora_A", "lora_linear_layer.down")
        out[f"{base}.{'lora_down' if down else 'lora_up'}.weight"] = tensor.contiguous()
        if down:
            rank = tensor.shape[0]
            out[f"{base}.alpha"] = torch.tensor(float(alphas.get(component, rank)))
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> Path:
    """Atomic write with string metadata."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.replace(path)
    return path


def training_metadata(recipe, family, steps: int, tag_counts: dict[str, int]) -> dict[str, str]:
    """kohya `ss_*` keys where kohya has them, plus modelspec title/architecture."""
    adapter, data = recipe.adapter, recipe.data
    trigger = sorted({e.prefix for e in data.datasets if e.prefix} |
                     ({recipe.dreambooth.instance_prompt} if recipe.dreambooth else set()))
    title = recipe.output.name or Path(recipe.output.dir).name
    return {
        "ss_base_model_version": family.name,
        "ss_sd_model_name": recipe.model.path,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(adapter.lora_alpha),
        "ss_resolution": str((data.resolution, data.resolution)),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(recipe.train.steps),
        "ss_learning_rate": str(recipe.train.lr),
        "ss_batch_size_per_device": str(recipe.train.batch_size),
        "ss_mixed_precision": recipe.train.mixed_precision,
        "ss_seed": str(recipe.train.seed),
        "ss_tag_frequency": json.dumps({"tuner": tag_counts}),
        "ss_training_comment": "trained with tuner",
        "tuner_family": family.name,
        "tuner_trigger_words": json.dumps(trigger),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{data.resolution}x{data.resolution}",
    }


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with extra metadata, keeping what it had."""
    tensors, metadata = read_adapter(path)
    write_safetensors(tensors, path, {**metadata, **extra})

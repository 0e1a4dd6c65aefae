"""LoRA adapters through PEFT: inject, collect trainable parameters, save in diffusers format."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from tuner import files
from tuner.adapters.patterns import check_adapter_patterns
from tuner.errors import TunerError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")  # adapter parameter names (LoRA, LoHa, LoKr)


def lora_config(adapter, targets, patterns: bool = True):
    """The peft config of adapter.type: LoraConfig, or LoHaConfig / LoKrConfig.
    patterns: apply adapter.rank_pattern / alpha_pattern (denoiser module names)."""
    if adapter.type != "lora":
        from tuner.adapters.lycoris import peft_config

        return peft_config(adapter, targets)
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        init_lora_weights=True if adapter.init == "default" else adapter.init,
        target_modules=targets,
        use_dora=adapter.dora,
        rank_pattern=dict(adapter.rank_pattern) if patterns else {},
        alpha_pattern=dict(adapter.alpha_pattern) if patterns else {},
    )


def denoiser_targets(adapter, family, denoiser) -> list[str] | str:
    """Module-name suffixes (default: the family's attention projections) or a full regex."""
    if adapter.target_regex:
        try:
            pattern = re.compile(adapter.target_regex)
        except re.error as exc:
            raise TunerError(f"adapter.target_regex: invalid regex ({exc})") from exc
        if not any(pattern.fullmatch(name) for name, _ in denoiser.named_modules()):
            raise TunerError(
                f"adapter.target_regex: {adapter.target_regex!r} matches no module "
                "of the denoiser; it must match full module names"
            )
        return adapter.target_regex
    targets = list(adapter.targets or family.default_targets(denoiser))
    names = [name for name, _ in denoiser.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise TunerError(
                f"adapter.targets: {target!r} names no module of the denoiser; "
                f"defaults for this family are {list(family.spec.default_targets)}"
            )
    return targets


def check_rank(rank: int, denoiser: torch.nn.Module, targets) -> None:
    """A rank no targeted layer can use (above min(in, out) of every one) is refused: it only
    costs memory and time (a rank of 100000 runs out of memory after minutes of setup)."""
    pattern = re.compile(targets) if isinstance(targets, str) else None
    widths = []
    for name, module in denoiser.named_modules():
        hit = (
            pattern.fullmatch(name)
            if pattern
            else any(name == t or name.endswith("." + t) for t in targets)
        )
        if not hit:
            continue
        if isinstance(module, torch.nn.Linear):
            widths.append(min(module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            widths.append(min(module.in_channels * k, module.out_channels))
    if widths and rank > max(widths):
        raise TunerError(
            f"adapter.rank: {rank} is larger than any targeted layer can use (the widest "
            f"allows {max(widths)}: min(in, out) features); use adapter.rank <= {max(widths)}"
        )


def inject(comps, adapter, family) -> dict[str, torch.nn.Module]:
    """Add LoRA to the denoiser (and text encoders if asked). Returns the trained modules by
    their pipeline component name. LoRA weights are fp32 whatever the base dtype."""
    trained = {}
    targets = denoiser_targets(adapter, family, comps.denoiser)
    if adapter.type != "lokr":  # a LoKr rank above the factors' widths means full factors
        check_rank(adapter.rank, comps.denoiser, targets)
    check_adapter_patterns(adapter, comps.denoiser, targets)
    comps.denoiser.add_adapter(lora_config(adapter, targets))
    trained[family.spec.denoiser] = comps.denoiser
    if adapter.text_encoder:
        for name, encoder in comps.text_encoders.items():
            # peft directly, not transformers' add_adapter: that one demands a newer peft
            # than some transformers/peft pairings on PyPI provide.
            inject_adapter_in_model(
                lora_config(adapter, list(family.spec.text_encoder_targets), patterns=False),
                encoder,
                adapter_name="default",
            )
            trained[name] = encoder
    # Base weights stay frozen in the compute dtype; only adapter params train, in fp32.
    for module in trained.values():
        for pname, param in module.named_parameters():
            param.requires_grad_(any(marker in pname for marker in ADAPTER_MARKERS))
    cast_training_params(list(trained.values()), dtype=torch.float32)
    return trained


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in PEFT naming (what set_peft_model_state_dict reads back); for an FSDP
    model being saved, the full tensors gathered beforehand (training/sharding.py)."""
    gathered = getattr(module, "_tuner_gathered_lora", None)
    return gathered if gathered is not None else get_peft_model_state_dict(module)


def float_cpu(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
        for name, sd in states.items()
    }


def adapter_metadata(trained: dict[str, torch.nn.Module]) -> dict[str, dict]:
    # Saved inside the file so that load_lora_weights rebuilds the same rank and alpha.
    return {name: module.peft_config["default"].to_dict() for name, module in trained.items()}


def adapter_kind(trained: dict[str, torch.nn.Module]) -> str:
    """'lora', 'loha' or 'lokr': what the trained modules hold."""
    config = next(iter(trained.values())).peft_config["default"]
    return {"LOHA": "loha", "LOKR": "lokr"}.get(str(config.peft_type.value), "lora")


def write_diffusers_file(
    directory: Path, family, states: dict[str, dict[str, torch.Tensor]], configs, weight_name
) -> Path:
    """Write a diffusers-layout adapter file the family's loaders read at its trained strength.

    states: component -> PEFT-named LoRA state (`module.lora_A.weight`); configs: component
    -> LoraConfig dict. Keys get the one naming the family's diffusers loader reads, and the
    alpha goes where each program that reads this layout finds it (ExportNaming.diffusers_alpha):
    the LoraConfig metadata, `.alpha` tensors, or folded into the up weights.
    """
    from tuner.adapters import formats

    mode = family.spec.export.diffusers_alpha
    if mode == "folded":
        states, configs = formats.fold_alpha(states, configs)
    layers = formats.loader_naming(states, family.spec.export.lora_key_naming)
    if mode == "tensors":
        alphas = formats.alpha_tensors(states, configs)
        layers = {name: {**sd, **alphas[name]} for name, sd in layers.items()}
        configs = {}  # diffusers refuses `.alpha` tensors next to lora_adapter_metadata
    family.save_lora(directory, layers, configs, weight_name)
    return directory / weight_name


def kohya_state(trained: dict[str, torch.nn.Module], family) -> dict[str, torch.Tensor]:
    """The trained adapter in kohya names with its trained `.alpha` (from the modules, not
    from a diffusers file that may hold alpha folded into its weights)."""
    from tuner.adapters.formats import kohya_layers

    if adapter_kind(trained) != "lora":
        from tuner.adapters import lycoris

        states = float_cpu({n: peft_state(m) for n, m in trained.items()})
        configs = {n: lycoris.json_config(m.peft_config["default"]) for n, m in trained.items()}
        return lycoris.to_lycoris(states, configs, family.spec.export.kohya_prefixes)
    flat = {
        f"{name}.{key}": tensor
        for name, sd in float_cpu({n: peft_state(m) for n, m in trained.items()}).items()
        for key, tensor in sd.items()
    }
    return kohya_layers(flat, adapter_metadata(trained), family.spec.export.kohya_prefixes)


def write_peft_file(path: Path, trained, states) -> None:
    """LoHa/LoKr in PEFT layout (no diffusers pipeline writer knows these kinds)."""
    from tuner.adapters import lycoris

    configs = {n: lycoris.json_config(m.peft_config["default"]) for n, m in trained.items()}
    metadata = {**lycoris.config_metadata(configs), "format": "pt"}
    files.save_safetensors(lycoris.peft_file_tensors(states), path, metadata)


def save_adapter(
    directory: Path, family, trained, weight_name: str = WEIGHT_NAME, extra_metadata=None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    states = float_cpu({name: peft_state(module) for name, module in trained.items()})

    # Written beside the target and renamed: an existing adapter is never half-overwritten.
    def write(tmp: Path) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
        try:
            if adapter_kind(trained) == "lora":
                write_diffusers_file(
                    staging, family, states, adapter_metadata(trained), weight_name
                )
            else:
                write_peft_file(staging / weight_name, trained, states)
            if extra_metadata:  # before publishing: the final file never lacks its metadata
                from tuner.adapters.formats import add_metadata

                add_metadata(staging / weight_name, extra_metadata)
            os.replace(staging / weight_name, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    files.write_file(directory / weight_name, write)
    return directory / weight_name

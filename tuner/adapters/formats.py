"""Adapter file formats: diffusers <-> kohya/webui names, and safetensors metadata.

Why by hand: diffusers' convert_state_dict_to_kohya writes alpha = rank (losing a trained alpha)
and names the SD1.x text encoder `lora_te1`; A1111/ComfyUI expect `lora_te` there. The mapping is
plain renaming, so we keep it here, small and tested against diffusers' own kohya loader.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tuner import files
from tuner.errors import TunerError

DIFFUSERS_LORA = re.compile(
    r"^(?P<component>[a-z_0-9]+?)\.(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$"
)
KOHYA_LORA = re.compile(
    r"^(?P<prefix>lora_[a-z0-9]+?)_(?P<module>[^.]+)\."
    r"(?P<kind>lora_down|lora_up|alpha)(?:\.weight)?$"
)
# A module's kohya-style alpha inside a diffusers-layout file (`transformer.<module>.alpha`):
# what ComfyUI reads there, and diffusers' Flux loader too (see ExportNaming.diffusers_alpha).
DIFFUSERS_ALPHA = re.compile(r"^(?P<component>[a-z_0-9]+?)\.(?P<module>.+)\.alpha$")
DOWN_KINDS = ("lora.down", "lora_A", "lora_linear_layer.down")
# A1111 and ComfyUI name CLIP text-encoder layers under the `text_model.` wrapper, which
# transformers 5 dropped from CLIPTextModel; we always write the wrapper so webui loaders (and
# diffusers, which accepts both) find every layer. T5 layers (`encoder.block.`) have no wrapper.
CLIP_WITHOUT_WRAPPER = re.compile(r"^(encoder\.layers\.|embeddings\.|final_layer_norm\b)")
DIFFUSERS_ONLY_METADATA = ("lora_adapter_metadata", "format")


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise TunerError(f"{path}: adapter file not found; give an output dir or a .safetensors")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # SafetensorError: a .ckpt/.pt, a truncated or an HTML file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise TunerError(
            f"{path}: not a readable .safetensors file ({reason}); give a LoRA saved as safetensors"
        ) from exc


def adapter_format(state: dict[str, torch.Tensor]) -> str:
    """'diffusers' or 'kohya', from the key names."""
    if state and all(KOHYA_LORA.match(k) for k in state):
        return "kohya"
    if any(DIFFUSERS_LORA.match(k) for k in state) and all(
        DIFFUSERS_LORA.match(k) or DIFFUSERS_ALPHA.match(k) for k in state
    ):
        return "diffusers"
    odd = next(
        (
            k
            for k in state
            if not (KOHYA_LORA.match(k) or DIFFUSERS_LORA.match(k) or DIFFUSERS_ALPHA.match(k))
        ),
        "",
    )
    raise TunerError(
        f"not a plain LoRA in diffusers or kohya layout (key {odd!r}); DoRA files are "
        "loaded by diffusers directly but not converted here, and LoHa/LoKr runs already "
        "wrote both layouts (PEFT and LyCORIS)"
    )


def lora_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """Component name -> its LoraConfig fields, from diffusers' `lora_adapter_metadata`."""
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in raw.items():
        component, _, field = key.partition(".")
        configs[component][field] = value
    return dict(configs)


def kohya_alpha(config: dict, module: str, rank: int) -> float:
    """The kohya alpha giving the same scale (kohya: alpha / rank) as the PEFT config does."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(alpha_pattern), module)
    alpha = float(alpha_pattern.get(key, config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    return alpha


def kohya_module_name(component: str, module: str, prefixes: dict[str, str]) -> str:
    if component.startswith("text_encoder") and CLIP_WITHOUT_WRAPPER.match(module):
        module = "text_model." + module
    return f"{prefixes[component]}_{module.replace('.', '_')}"


def to_kohya(
    state: dict[str, torch.Tensor], metadata: dict[str, str], prefixes: dict[str, str]
) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA -> kohya names with `.alpha` tensors. A module's alpha is its
    `.alpha` tensor where the file has one, else what the file's LoraConfig gives it."""
    return kohya_layers(state, lora_configs(metadata), prefixes)


def kohya_layers(
    state: dict[str, torch.Tensor], configs: dict[str, dict], prefixes: dict[str, str]
) -> dict[str, torch.Tensor]:
    """`component.module.<lora kind>.weight` tensors (+ optional `component.module.alpha`)
    and component -> LoraConfig dict -> kohya names with `.alpha` tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if DIFFUSERS_ALPHA.match(key):
            continue  # read with its module's down weight
        match = DIFFUSERS_LORA.match(key)
        if match is None:
            raise TunerError(
                f"cannot convert key {key!r} to kohya (DoRA and LoHa/LoKr adapters "
                "have no kohya layout here); export the diffusers format instead"
            )
        component, module = match["component"], match["module"]
        if component not in prefixes:
            raise TunerError(f"no kohya prefix for component {component!r}")
        base = kohya_module_name(component, module, prefixes)
        down = match["kind"] in DOWN_KINDS
        out[f"{base}.{'lora_down' if down else 'lora_up'}.weight"] = tensor.contiguous()
        if down:
            given = state.get(f"{component}.{module}.alpha")
            alpha = (
                float(given)
                if given is not None
                else kohya_alpha(configs.get(component, {}), module, tensor.shape[0])
            )
            out[f"{base}.alpha"] = torch.tensor(alpha)
    return out


def to_comfy(state: dict[str, torch.Tensor], metadata: dict[str, str], export) -> dict:
    """The kohya/ComfyUI file's tensors: the family's own layout (ExportNaming.comfy_layout)
    where it has one, else kohya names."""
    if export.comfy_layout is not None:
        return export.comfy_layout(state, metadata)
    return to_kohya(state, metadata, export.kohya_prefixes)


def kohya_names(family, comps) -> dict[str, tuple[str, str]]:
    """kohya module name -> (pipeline component, module name) for every layer of a model."""
    components = {family.spec.denoiser: comps.denoiser, **comps.text_encoders}
    names = {}
    for component, model in components.items():
        if component not in family.spec.export.kohya_prefixes:
            continue
        for module, _ in model.named_modules():
            if module:
                plain = f"{family.spec.export.kohya_prefixes[component]}_{module.replace('.', '_')}"
                names[plain] = (component, module)
                names[kohya_module_name(component, module, family.spec.export.kohya_prefixes)] = (
                    component,
                    module,
                )
    return names


def kohya_to_diffusers(kohya: dict[str, torch.Tensor], names: dict[str, tuple[str, str]]):
    """kohya LoRA -> (component -> state dict in PEFT names, component -> LoraConfig dict),
    for `adapters.lora.write_diffusers_file` (which picks the naming the family's loader reads).

    kohya scales each module by its own `.alpha / rank`. When one component's modules all share
    one rank and one alpha, the weights are kept and `lora_alpha` goes into the diffusers
    metadata (exactly what our trainer writes). When they differ, alpha / rank is folded into
    each up weight and the metadata says scale 1 (lora_alpha = rank) everywhere: the file then
    means the same thing to every loader, including those that ignore the metadata.
    """
    from peft import LoraConfig

    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in kohya.items():
        match = KOHYA_LORA.match(key)
        modules[key.split(".", 1)[0]][match["kind"]] = tensor
    unknown = sorted(m for m in modules if m not in names)
    if unknown:
        raise TunerError(
            f"{len(unknown)} kohya modules (e.g. {unknown[0]}) name no layer of the "
            "base model; use the base model the adapter was trained on"
        )
    by_component: dict[str, dict[str, dict]] = defaultdict(dict)
    for kohya_module, parts in modules.items():
        if "lora_down" not in parts or "lora_up" not in parts:
            raise TunerError(f"kohya module {kohya_module} lacks lora_down or lora_up weights")
        component, module = names[kohya_module]
        rank = parts["lora_down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # kohya default
        by_component[component][module] = {
            "down": parts["lora_down"],
            "up": parts["lora_up"],
            "rank": rank,
            "alpha": alpha,
        }
    layers, configs = {}, {}
    for component, entries in by_component.items():
        uniform = len({(e["rank"], e["alpha"]) for e in entries.values()}) == 1
        rank = Counter(e["rank"] for e in entries.values()).most_common(1)[0][0]
        state, odd_ranks = {}, {}
        for module, e in sorted(entries.items()):
            up = e["up"] if uniform else e["up"] * (e["alpha"] / e["rank"])
            state[f"{module}.lora_A.weight"] = e["down"].contiguous()
            state[f"{module}.lora_B.weight"] = up.contiguous()
            if e["rank"] != rank:
                odd_ranks[module] = e["rank"]
        alpha = next(iter(entries.values()))["alpha"] if uniform else float(rank)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=sorted(entries),
            rank_pattern=odd_ranks,
            alpha_pattern=dict(odd_ranks),
        )
        layers[component] = state
        configs[component] = config.to_dict()
    return layers, configs


def loader_naming(
    states: dict[str, dict[str, torch.Tensor]], naming: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-component PEFT-named LoRA state (`module.lora_A.weight`) -> the one naming the
    family's loader reads for the whole file: "peft" as is; "diffusers" the UNet-era
    `lora.down`/`lora.up` names, unless some layers have none (conv LoRA keeps `lora_A`), in
    which case PEFT names throughout. diffusers' loaders decide the naming from a file's first
    key and drop every layer named the other way, so a file never mixes the two."""
    from diffusers.utils import convert_state_dict_to_diffusers

    if naming == "peft":
        return states
    converted = {name: convert_state_dict_to_diffusers(sd) for name, sd in states.items()}
    if any(".lora_A." in key for sd in converted.values() for key in sd):
        return states
    return converted


def module_scales(states: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict]):
    """(component, module) -> (kohya alpha, rank) for every LoRA module of PEFT-named states."""
    scales = {}
    for component, sd in states.items():
        for key, tensor in sd.items():
            if key.endswith(".lora_A.weight"):
                module, rank = key.removesuffix(".lora_A.weight"), tensor.shape[0]
                alpha = kohya_alpha(configs.get(component, {}), module, rank)
                scales[(component, module)] = (alpha, rank)
    return scales


def fold_alpha(states, configs):
    """alpha / rank multiplied into each up weight (and LoRA bias); configs say scale 1
    (lora_alpha = rank, per module too). The file then means the same to loaders that read
    its metadata (diffusers) and to those that read no alpha at all (ComfyUI: scale 1)."""
    scales = module_scales(states, configs)
    folded = {}
    for component, sd in states.items():
        out = {}
        for key, tensor in sd.items():
            module, sep, _ = key.partition(".lora_B.")
            if sep:
                alpha, rank = scales[(component, module)]
                tensor = tensor * (alpha / rank)
            out[key] = tensor.contiguous()
        folded[component] = out
    new_configs = {}
    for component, config in configs.items():
        config = dict(config)
        config["lora_alpha"] = config["r"]
        config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
        config["use_rslora"] = False
        new_configs[component] = config
    return folded, new_configs


def alpha_tensors(states, configs) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's alpha as a `<module>.alpha` tensor, kohya's meaning (scale alpha / rank)."""
    scales = module_scales(states, configs)
    out: dict[str, dict[str, torch.Tensor]] = {component: {} for component in states}
    for (component, module), (alpha, _) in scales.items():
        out[component][f"{module}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_scales_uniform(kohya: dict[str, torch.Tensor]) -> bool:
    """True when every module under each prefix has one rank and one alpha: the only case
    diffusers' own kohya loader scales right for SD (it keys per-module alphas to names that
    match no layer, so mixed alphas silently become one)."""
    pairs = defaultdict(set)
    for key, tensor in kohya.items():
        if key.endswith(".lora_down.weight"):
            module = key.split(".", 1)[0]
            alpha = kohya.get(f"{module}.alpha", torch.tensor(float(tensor.shape[0])))
            pairs[KOHYA_LORA.match(key)["prefix"]].add((tensor.shape[0], float(alpha)))
    return all(len(found) == 1 for found in pairs.values())


def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata worth keeping across a format change (not diffusers' own layout keys: a kohya
    file with `lora_adapter_metadata` makes diffusers' loader fail)."""
    return {k: v for k, v in metadata.items() if k not in DIFFUSERS_ONLY_METADATA}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> Path:
    """Atomic write with string metadata."""
    return files.save_safetensors(tensors, Path(path), metadata)


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with extra metadata, keeping what it had."""
    tensors, metadata = read_adapter(path)
    write_safetensors(tensors, path, {**metadata, **extra})

"""LoHa and LoKr adapters (peft's LoHaConfig / LoKrConfig) and their two files.

- The PEFT file (`pytorch_lora_weights.safetensors`): `<component>.<module>.<hada_/lokr_ kind>`,
  the tensors exactly as peft holds them, with each component's peft config in
  `lora_adapter_metadata` (diffusers' place for it). `tuner sample`/`grid`/`merge` load it
  through peft (`load_into`); diffusers' pipeline `load_lora_weights` reads no LoHa and reads
  LoKr for a few pipelines only (README, "LoHa and LoKr").
- The LyCORIS file (`pytorch_lora_weights_kohya.safetensors`): kohya module names (the same
  names our kohya LoRA export uses) + `hada_w1_a/b`, `hada_w2_a/b` (`hada_t1/t2` with effective
  conv) or `lokr_w1`/`lokr_w1_a/b`, `lokr_w2`/`lokr_w2_a/b` (`lokr_t2`), + `.alpha`: what
  ComfyUI (comfy/weight_adapter/loha.py, lokr.py) and A1111/Forge's LyCORIS loaders read.

Scale: peft multiplies every LoHa/LoKr delta by alpha / r. ComfyUI multiplies a LoHa delta by
alpha / rank(hada_w1_b) and a LoKr delta by alpha / rank(w2_b, else w1_b), the same number; but
when both LoKr factors are full matrices it applies no alpha at all (scale 1). For such modules
the LyCORIS file carries alpha / r folded into `lokr_w1` and alpha = r (as LyCORIS writes them).
The tensors' layouts (tucker cores included) are the same in peft and LyCORIS.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import torch

from tuner.errors import TunerError

KINDS = ("loha", "lokr")
WEIGHTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
ALL_WEIGHTS = "|".join(w for kind in KINDS for w in WEIGHTS[kind])
PEFT_KEY = re.compile(rf"^(?P<component>[a-z_0-9]+?)\.(?P<module>.+)\.(?P<kind>{ALL_WEIGHTS})$")
LYCORIS_KEY = re.compile(rf"^(?P<module>lora_[a-z0-9]+?_[^.]+)\.(?P<kind>{ALL_WEIGHTS}|alpha)$")
# Keys only LoHa/LoKr options set; with adapter.type lora they are refused.
LYCORIS_ONLY = ("rank_dropout", "module_dropout", "effective_conv", "decompose_both")
LOKR_ONLY = ("decompose_both", "decompose_factor")
CONFIG_FIELDS = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d")


def check_options(adapter, spec) -> None:
    """Options that cannot apply to adapter.type are refused (one line each)."""
    from tuner.recipe.schema import AdapterSection

    default = AdapterSection()
    if adapter.type == "lora":
        for key in (*LYCORIS_ONLY, "decompose_factor"):
            if getattr(adapter, key) != getattr(default, key):
                raise TunerError(
                    f"adapter.{key}: applies to adapter.type loha or lokr; remove it or set "
                    "adapter.type=loha|lokr"
                )
        return
    kind = adapter.type
    lora_only = {
        "dora": "DoRA is a LoRA variant",
        "init": "LoRA initialisations only",
        "dropout": "LoRA input dropout; use adapter.rank_dropout or adapter.module_dropout",
        "text_encoder": "text-encoder LoHa/LoKr is not supported; train the denoiser only",
    }
    for key, why in lora_only.items():
        if getattr(adapter, key) != getattr(default, key):
            raise TunerError(f"adapter.{key}: does not apply to adapter.type {kind} ({why})")
    if kind == "loha":
        for key in LOKR_ONLY:
            if getattr(adapter, key) != getattr(default, key):
                raise TunerError(f"adapter.{key}: applies to adapter.type lokr only; remove it")
    if adapter.decompose_factor == 0:
        raise TunerError("adapter.decompose_factor: 0 is no factor; use -1 or a positive divisor")
    if spec.export.comfy_layout is not None:
        raise TunerError(
            f"adapter.type: {kind} is not supported for {spec.name} (its ComfyUI file has a "
            "LoRA-only layout here); use adapter.type=lora"
        )


def peft_config(adapter, targets):
    from peft import LoHaConfig, LoKrConfig

    common = {
        "r": adapter.rank,
        "alpha": adapter.lora_alpha,
        "rank_dropout": adapter.rank_dropout,
        "module_dropout": adapter.module_dropout,
        "use_effective_conv2d": adapter.effective_conv,
        "target_modules": targets,
    }
    if adapter.type == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(
        **common,
        decompose_both=adapter.decompose_both,
        decompose_factor=adapter.decompose_factor,
    )


def config_from_dict(fields: dict):
    """A peft LoHaConfig / LoKrConfig from its saved to_dict() (unknown fields dropped, so a
    file from another peft version still loads)."""
    import dataclasses

    from peft import LoHaConfig, LoKrConfig

    kind = getattr(fields.get("peft_type"), "value", fields.get("peft_type"))  # enum or str
    cls = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}.get(str(kind).upper())
    if cls is None:
        raise TunerError(f"adapter config of type {fields.get('peft_type')!r} is not LoHa/LoKr")
    names = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft_type"}
    return cls(**{k: v for k, v in fields.items() if k in names})


def json_config(config) -> dict:
    """config.to_dict() with sets as sorted lists (JSON has no sets)."""
    return {
        k: sorted(v) if isinstance(v, set) else v
        for k, v in config.to_dict().items()
        if not k.startswith("_")
    }


def state_kind(state: dict[str, torch.Tensor]) -> str | None:
    """'loha', 'lokr' or None (not a LoHa/LoKr file), from the key names."""
    for kind in KINDS:
        if any(key.rsplit(".", 1)[-1] in WEIGHTS[kind] for key in state):
            return kind
    return None


def module_scale(config: dict, module: str) -> tuple[float, int]:
    """(alpha, r) peft gives this module (rank_pattern / alpha_pattern applied)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(list(ranks), module), config["r"]) if ranks else config["r"]
    alpha = alphas.get(get_pattern_key(list(alphas), module), config["alpha"]) if alphas else None
    return float(config["alpha"] if alpha is None else alpha), int(rank)


def full_kronecker(parts: dict) -> bool:
    """Both LoKr factors stored as full matrices: ComfyUI and LyCORIS then apply no alpha."""
    return "lokr_w1" in parts and "lokr_w2" in parts


def by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        module, _, kind = key.rpartition(".")
        modules[module][kind] = tensor
    return modules


def to_lycoris(states, configs, prefixes) -> dict[str, torch.Tensor]:
    """component -> PEFT-named LoHa/LoKr state, component -> peft config dict -> the LyCORIS
    file's tensors (kohya module names, `.alpha` per module)."""
    from tuner.adapters.formats import kohya_module_name

    out: dict[str, torch.Tensor] = {}
    for component, sd in states.items():
        if component not in prefixes:
            raise TunerError(f"no kohya prefix for component {component!r}")
        for module, parts in sorted(by_module(sd).items()):
            alpha, rank = module_scale(configs[component], module)
            name = kohya_module_name(component, module, prefixes)
            if full_kronecker(parts):
                parts = {**parts, "lokr_w1": parts["lokr_w1"] * (alpha / rank)}
                alpha = float(rank)
            for kind, tensor in parts.items():
                out[f"{name}.{kind}"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def from_lycoris(tensors, configs, names) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of to_lycoris, given the peft configs (from the file's metadata) and the base
    model's kohya names (formats.kohya_names)."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        match = LYCORIS_KEY.match(key)
        if match is None:
            raise TunerError(f"key {key!r} is not a LoHa/LoKr key in LyCORIS layout")
        modules[match["module"]][match["kind"]] = tensor
    unknown = sorted(m for m in modules if m not in names)
    if unknown:
        raise TunerError(
            f"{len(unknown)} LyCORIS modules (e.g. {unknown[0]}) name no layer of the base "
            "model; use the base model the adapter was trained on"
        )
    states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for kohya_module, parts in modules.items():
        component, module = names[kohya_module]
        parts = dict(parts)
        parts.pop("alpha", None)  # peft's scale comes from the config
        if full_kronecker(parts):
            alpha, rank = module_scale(configs[component], module)
            parts["lokr_w1"] = parts["lokr_w1"] / (alpha / rank)
        for kind, tensor in parts.items():
            states[component][f"{module}.{kind}"] = tensor
    return dict(states)


def peft_file_tensors(states) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": tensor.contiguous()
        for component, sd in states.items()
        for key, tensor in sd.items()
    }


def config_metadata(configs: dict[str, dict], key: str = "lora_adapter_metadata") -> dict:
    """diffusers' `lora_adapter_metadata` layout: `<component>.<field>` -> value, as JSON. The
    LyCORIS file keeps the same under CONFIG_KEY (diffusers' key is for its own layout)."""
    flat = {f"{c}.{k}": v for c, fields in configs.items() for k, v in fields.items()}
    return {key: json.dumps(flat, sort_keys=True)}


CONFIG_KEY = "tuner_peft_config"


def read_configs(metadata: dict[str, str]) -> dict[str, dict]:
    from tuner.adapters.formats import lora_configs

    raw = metadata.get("lora_adapter_metadata") or metadata.get(CONFIG_KEY) or "{}"
    configs = lora_configs({"lora_adapter_metadata": raw})
    if not configs:
        raise TunerError(
            "this LoHa/LoKr file has no peft config in its metadata (lora_adapter_metadata); "
            "tuner loads the LoHa/LoKr files it writes"
        )
    return configs


def split_peft_file(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise TunerError(f"key {key!r} is not a LoHa/LoKr key in PEFT layout")
        states[match["component"]][f"{match['module']}.{match['kind']}"] = tensor
    return dict(states)


def peft_states(state, metadata, family, pipe):
    """Either file -> (component -> PEFT-named state, component -> peft config dict)."""
    from tuner.adapters.formats import kohya_names

    lycoris_layout = all(LYCORIS_KEY.match(key) for key in state)
    if lycoris_layout:
        names = kohya_names(family, family.components_from_pipeline(pipe, ""))
        if not (metadata.get(CONFIG_KEY) or metadata.get("lora_adapter_metadata")):
            return foreign_lycoris(state, names)  # e.g. from LyCORIS / kohya sd-scripts
    configs = read_configs(metadata)
    if lycoris_layout:
        return from_lycoris(state, configs, names), configs
    return split_peft_file(state), configs


def foreign_lycoris(tensors, names):
    """A LyCORIS file without our peft config: each module's scale (ComfyUI's rule) folded into
    its first factor, and a peft config (scale 1) that rebuilds the file's factor shapes."""
    from collections import Counter

    from peft import LoHaConfig, LoKrConfig

    configs_by_kind = {}
    modules = lycoris_modules(tensors, names)
    states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    ranks: dict[str, dict[str, int]] = defaultdict(dict)
    for (component, module), parts in modules.items():
        alpha = parts.pop("alpha", None)
        if "hada_w1_a" in parts:
            configs_by_kind[component] = "loha"
            rank = dim = parts["hada_w1_b"].shape[0]
            first = "hada_w1_a"
        else:
            configs_by_kind[component] = "lokr"
            dim = next((parts[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)
            first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            # Full factors: a rank of at least half of every factor side keeps them full in peft.
            rank = dim or max(max(parts["lokr_w1"].shape), max(parts["lokr_w2"].shape[:2]))
        if alpha is not None and dim is not None:
            parts[first] = parts[first] * (float(alpha) / dim)
        ranks[component][module] = rank
        for kind, tensor in parts.items():
            states[component][f"{module}.{kind}"] = tensor
    configs = {}
    for component, by_name in ranks.items():
        common = Counter(by_name.values()).most_common(1)[0][0]
        odd = {m: r for m, r in by_name.items() if r != common}
        keys = set(states[component])
        fields = {
            "r": common,
            "alpha": common,
            "rank_pattern": odd,
            "alpha_pattern": dict(odd),
            "use_effective_conv2d": any(k.endswith(("_t1", "_t2")) for k in keys),
            "target_modules": sorted(by_name),
        }
        if configs_by_kind[component] == "loha":
            configs[component] = json_config(LoHaConfig(**fields))
        else:
            factor = lokr_factor(states[component])
            both = any(k.endswith(".lokr_w1_a") for k in keys)
            config = LoKrConfig(**fields, decompose_both=both, decompose_factor=factor)
            configs[component] = json_config(config)
    return dict(states), configs


def lycoris_modules(tensors, names) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """LyCORIS tensors -> (component, module) -> {kind: tensor}."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        module, _, kind = key.partition(".")
        if module not in names:
            raise TunerError(
                f"LyCORIS module {module} names no layer of the base model; use the base "
                "model the adapter was trained on"
            )
        modules[names[module]][kind] = tensor
    return modules


def lokr_factor(sd: dict[str, torch.Tensor]) -> int:
    """The decompose_factor under which peft's factorization gives every module's factor
    sizes (a fixed factor is the left size where it divides; -1 is near-square)."""
    from peft.tuners.lokr.layer import factorization

    shapes = []
    for parts in by_module(sd).values():
        w1 = parts.get("lokr_w1")
        if w1 is None:
            w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts.get("lokr_w2")
        if w2 is not None:
            out_k, in_n = w2.shape[:2]
        elif "lokr_t2" in parts:
            out_k, in_n = parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1]
        else:  # a @ b of a conv has in * kernel columns: its input side is not known here
            out_k, in_n = parts["lokr_w2_a"].shape[0], None
        shapes.append(((w1.shape[0], out_k), (w1.shape[1], in_n)))

    def fits(size: tuple, candidate: int) -> bool:
        return size[1] is None or factorization(size[0] * size[1], candidate) == size

    for candidate in [-1, *sorted({s[0][0] for s in shapes})]:
        if all(fits(out, candidate) and fits(inp, candidate) for out, inp in shapes):
            return candidate
    raise TunerError("cannot find the LoKr factor size this file was made with; not loadable")


def load_into(pipe, family, state, metadata, adapter_name: str) -> int:
    """Add the file's LoHa/LoKr to the pipeline's models through peft, under adapter_name
    (pipe.set_adapters / fuse_lora then work as for LoRA). Returns the modules loaded; every
    tensor of the file must land on a layer."""
    from peft.utils import set_peft_model_state_dict

    states, configs = peft_states(state, metadata, family, pipe)
    loaded = 0
    for component, sd in states.items():
        model = getattr(pipe, component, None)
        if model is None or component not in configs:
            raise TunerError(f"this adapter holds a {component!r} the pipeline does not have")
        config = config_from_dict(configs[component])
        config.target_modules = sorted(by_module(sd))
        model.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}" in k]
        if unexpected or missing:
            raise TunerError(
                f"{len(unexpected) + len(missing)} LoHa/LoKr tensors did not fit the base model "
                f"(e.g. {(unexpected or missing)[0]}); was it trained on another base model?"
            )
        loaded += len(by_module(sd))
    return loaded


def network_args(adapter) -> dict[str, str]:
    """kohya `ss_network_args` as LyCORIS' kohya network (lycoris.kohya) records them."""
    args = {
        "algo": adapter.type,
        "rank_dropout": str(adapter.rank_dropout),
        "module_dropout": str(adapter.module_dropout),
        "use_tucker": str(adapter.effective_conv),
    }
    if adapter.type == "lokr":
        args["factor"] = str(adapter.decompose_factor)
        args["decompose_both"] = str(adapter.decompose_both)
    return args

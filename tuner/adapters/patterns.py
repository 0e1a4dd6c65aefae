"""Per-block settings: adapter.rank_pattern / adapter.alpha_pattern (peft's LoraConfig fields)
and train.lr_pattern (extra optimizer parameter groups).

One matching rule for all three, peft's own (peft.utils.other.get_pattern_key): a pattern
matches a module when it matches the end of the module's name at a dot boundary
(`(.*\\.)?PATTERN$`), and the first matching pattern in the recipe's order wins. So
`up_blocks.1` and `attn1.to_q` work as written, and a regex like `down_blocks\\.[01]\\..*`
too. A pattern that matches no LoRA-targeted module is refused (it would silently do nothing).
"""

from __future__ import annotations

import re

import torch

from tuner.errors import TunerError


def matches(pattern: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def first_match(patterns, module: str) -> str | None:
    return next((p for p in patterns if matches(p, module)), None)


def check_patterns(patterns, modules: list[str], key: str) -> None:
    """Every pattern must match at least one of the LoRA-targeted module names."""
    for pattern in patterns:
        if not any(matches(pattern, name) for name in modules):
            example = modules[0] if modules else "none"
            raise TunerError(
                f"{key}: {pattern!r} matches no LoRA module of the denoiser (names look like "
                f"{example!r}; a pattern matches a name's end at a dot); fix or remove it"
            )


# Where an adapter parameter's name leaves its module's name (LoRA, DoRA, LoHa, LoKr).
ADAPTER_PART = re.compile(r"\.(lora_|hada_|lokr_)")


def module_of(param_name: str) -> str:
    """`blocks.0.to_q.lora_A.default.weight` -> `blocks.0.to_q`."""
    return ADAPTER_PART.split(param_name, maxsplit=1)[0]


def targeted_modules(denoiser: torch.nn.Module, targets) -> list[str]:
    """The module names adapter targets select (a full regex, or name suffixes), before
    injection: what rank_pattern and alpha_pattern may name."""
    if isinstance(targets, str):
        regex = re.compile(targets)
        return [name for name, _ in denoiser.named_modules() if regex.fullmatch(name)]
    return [
        name
        for name, _ in denoiser.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    ]


def check_adapter_patterns(adapter, denoiser: torch.nn.Module, targets) -> None:
    modules = targeted_modules(denoiser, targets)
    check_patterns(adapter.rank_pattern, modules, "adapter.rank_pattern")
    check_patterns(adapter.alpha_pattern, modules, "adapter.alpha_pattern")


def lr_groups(model: torch.nn.Module, lr: float, lr_pattern: dict[str, float]) -> list[dict]:
    """The model's trainable parameters split by train.lr_pattern: one group per pattern that
    matches (lr x multiplier), then one for the rest at lr; each parameter in exactly one."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    modules = sorted({module_of(name) for name, _ in trainable})
    check_patterns(lr_pattern, modules, "train.lr_pattern")
    by_pattern: dict[str | None, list] = {p: [] for p in lr_pattern}
    by_pattern[None] = []
    for name, param in trainable:
        by_pattern[first_match(lr_pattern, module_of(name))].append(param)
    groups = [
        {"params": params, "lr": lr * lr_pattern[p], "pattern": p}
        for p, params in by_pattern.items()
        if p is not None
    ]
    groups.append({"params": by_pattern[None], "lr": lr, "pattern": None})
    return [g for g in groups if g["params"]]

"""Optimizers and learning-rate schedules.

Every optimizer gets the recipe's parameter groups (each with its own lr) and train.lr; the
named ones also get train.weight_decay and, where they take them, train.betas / train.eps
(train_section.OPTIMIZER_TAKES). train.optimizer_args are extra keyword arguments for any optimizer,
given last so they win. Optional packages are imported only when chosen.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging

import torch
from diffusers.optimization import get_scheduler

from tuner.errors import TunerError

log = logging.getLogger("tuner")

# optimizer -> (module, class, pip package); the extra `optimizers` in pyproject.toml.
CLASSES = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "came": ("came_pytorch", "CAME", "came-pytorch"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}


def optimizer_class(train) -> type:
    """The class train.optimizer names; a missing package or a bad optimizer_class is one line."""
    if train.optimizer == "adamw":
        return torch.optim.AdamW
    if train.optimizer == "custom":
        module_name, _, class_name = (train.optimizer_class or "").rpartition(".")
        what = f"train.optimizer_class: cannot import {train.optimizer_class!r}"
        fix = "check the name, or pip install its package"
    else:
        module_name, class_name, package = CLASSES[train.optimizer]
        what = f"train.optimizer: {train.optimizer} needs {package}, which failed to import"
        fix = f"pip install {package}"
    try:
        module = importlib.import_module(module_name) if module_name else None
    except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else ""
        raise TunerError(f"{what} ({reason}); {fix}") from exc
    found = getattr(module, class_name, None) if module else None
    if not isinstance(found, type) or not issubclass(found, torch.optim.Optimizer):
        raise TunerError(
            f"train.optimizer_class: {train.optimizer_class!r} is not an optimizer class (no "
            f"torch.optim.Optimizer {class_name!r} in module {module_name!r}); write it as "
            "module.Class, e.g. torch.optim.SGD"
        )
    return found


def optimizer_kwargs(train, device: torch.device) -> dict:
    """Keyword arguments beside the parameter groups: the recipe's, then optimizer_args."""
    from tuner.recipe.train_section import OPTIMIZER_TAKES

    name = train.optimizer
    kwargs = {} if name == "custom" else {"lr": train.lr, "weight_decay": train.weight_decay}
    for key in OPTIMIZER_TAKES[name]:
        # AdamW's defaults are the recipe's; the others keep their own unless asked.
        if name in ("adamw", "adamw8bit") or train.changed(key):
            kwargs[key] = tuple(train.betas) if key == "betas" else train.eps
    if name == "custom":
        kwargs["lr"] = train.lr
    elif name == "adamw":
        kwargs["fused"] = use_fused_adamw(train, device)
    elif name == "adafactor":
        # A plain optimizer at the recipe's lr: no relative step, no parameter-scale lr.
        kwargs.update(relative_step=False, scale_parameter=False, warmup_init=False)
    elif name == "adamw_schedulefree":
        kwargs["warmup_steps"] = train.warmup_steps  # its own warmup (the schedule is constant)
    return {**kwargs, **train.optimizer_args}


def check_optimizer(train, adapter=None) -> None:
    """What `tuner check` and training verify before anything loads: the package imports, every
    optimizer_args key is an argument of the class, and Prodigy's lr is of Prodigy's scale and
    one for all groups (Prodigy refuses groups at different lrs other than 0)."""
    cls = optimizer_class(train)
    if train.optimizer == "prodigy":
        odd = [k for k, factor in train.lr_pattern.items() if factor not in (0.0, 1.0)]
        if odd:
            raise TunerError(
                f"train.lr_pattern: prodigy trains every group at one lr (multipliers 0 or 1 "
                f"only), {odd[0]!r} has {train.lr_pattern[odd[0]]}; use another optimizer"
            )
        if adapter is not None and adapter.text_encoder_lr not in (None, train.lr):
            raise TunerError(
                "adapter.text_encoder_lr: prodigy trains every group at one lr; remove "
                "text_encoder_lr or use another optimizer"
            )
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [key for key in train.optimizer_args if key not in params]
        if unknown:
            raise TunerError(
                f"train.optimizer_args: {cls.__name__} takes no argument {unknown[0]!r}; "
                f"it takes {', '.join(k for k in params if k not in ('self', 'params'))}"
            )
    if train.optimizer == "prodigy" and train.lr < 0.1:
        log.warning(
            "train.lr=%g looks like an AdamW lr: Prodigy estimates the step size itself and "
            "expects train.lr ~1.0 (a multiplier on its estimate)",
            train.lr,
        )


def build_optimizer(groups: list[dict], train, device: torch.device):
    cls = optimizer_class(train)
    try:
        return cls(groups, **optimizer_kwargs(train, device))
    except (TypeError, ValueError) as exc:
        raise TunerError(
            f"train.optimizer: {cls.__name__} refused its settings ({exc}); check "
            "train.optimizer_args"
        ) from exc


def use_fused_adamw(train, device: torch.device) -> bool:
    """train.fused_adamw (default: where torch has the kernel). One kernel for all LoRA tensors
    instead of one per tensor: 4x faster than the per-tensor loop on a CPU, one launch on CUDA,
    and its found_inf input lets the NaN guard skip a step without a host sync."""
    if train.fused_adamw is None:
        return device.type in FUSED_ADAMW_DEVICES
    return train.fused_adamw


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_scheduler(optimizer, train):
    # Schedule-free: the constant schedule (the schema refuses others) and the optimizer's own
    # warmup, so diffusers' warmup must not apply a second time.
    warmup = 0 if train.optimizer == "adamw_schedulefree" else train.warmup_steps
    return get_scheduler(
        train.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=train.steps,
    )


def has_eval_mode(optimizer) -> bool:
    """Schedule-free optimizers train at one point (y) and evaluate at another (x)."""
    groups = optimizer.param_groups
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


def train_mode(optimizer) -> None:
    if has_eval_mode(optimizer):
        optimizer.train()


@contextlib.contextmanager
def eval_weights(optimizer, stay: bool = False):
    """The evaluation weights in the model while inside (sampling, saving), then back to the
    training weights unless `stay` (after the last step: the outputs are the eval weights, the
    same bits as the last checkpoint). A no-op for other optimizers and when already in eval."""
    switch = has_eval_mode(optimizer) and optimizer.param_groups[0]["train_mode"]
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch and not stay:
            optimizer.train()

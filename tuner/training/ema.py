"""An exponential moving average of the adapter weights (`train.ema`), kept in fp32.

    ema <- d * ema + (1 - d) * weights      after every `every`-th step from `start_step`
    d = min(decay, (1 + n) / (10 + n))       on, n = updates made before (a warm-up, so a
                                             short run's average is not mostly the init);
                                             before start_step, ema = weights

It is saved as a second adapter (`pytorch_lora_weights_ema.safetensors` + its kohya twin),
drawn in the training grid as its own column, and its state goes into every checkpoint, so a
resumed run's average equals an uninterrupted one's.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from tuner import files

log = logging.getLogger("tuner")
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"
EMA_KOHYA_WEIGHT_NAME = "pytorch_lora_weights_ema_kohya.safetensors"
STATE_FILE = "ema_state.safetensors"


class AdapterEma:
    """fp32 shadows of the trained parameters (the order of Run.params)."""

    def __init__(self, params: list[torch.nn.Parameter], config):
        self.params, self.config = params, config
        self.device = torch.device("cpu") if config.on_cpu else None
        self.shadows = [self._copy(p) for p in params]

    def _copy(self, param: torch.Tensor) -> torch.Tensor:
        return param.detach().to(self.device or param.device, torch.float32, copy=True)

    def decay_at(self, step: int) -> float:
        """The decay of the update after step `step` (a multiple of every, >= start_step)."""
        cfg = self.config
        first = -(-max(cfg.start_step, 1) // cfg.every) * cfg.every
        done = (step - first) // cfg.every  # updates made before this one
        return min(cfg.decay, (1 + done) / (10 + done))

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based), applied or skipped: a function of the step
        alone, so a resumed run updates exactly as an uninterrupted one."""
        cfg, params = self.config, self.params
        if step < cfg.start_step:
            with torch.no_grad():
                for shadow, param in zip(self.shadows, params):
                    shadow.copy_(param.detach())
            return
        if step % cfg.every:
            return
        current = [p.detach().to(s.device, torch.float32) for s, p in zip(self.shadows, params)]
        with torch.no_grad():
            torch._foreach_lerp_(self.shadows, current, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadows)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadows):
            raise ValueError(f"{len(state)} EMA tensors for {len(self.shadows)} parameters")
        with torch.no_grad():
            for i, shadow in enumerate(self.shadows):
                shadow.copy_(state[f"ema.{i}"])

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the adapter's parameters for a while (saving, sampling)."""
        params = self.params
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, shadow in zip(params, self.shadows):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(params, backup):
                    param.copy_(saved)


def build_ema(run) -> AdapterEma | None:
    config = run.recipe.train.ema
    return AdapterEma(run.params, config) if config is not None else None


def save_state(ema: AdapterEma | None, folder: Path) -> None:
    if ema is not None:
        files.save_safetensors(ema.state_dict(), folder / STATE_FILE)


def load_state(ema: AdapterEma | None, folder: Path) -> None:
    """A checkpoint's average; one saved without train.ema starts from the resumed weights."""
    if ema is None:
        return
    path = folder / STATE_FILE
    if not path.is_file():
        log.warning(
            "train.ema: checkpoint %s has no average (trained without train.ema); it starts "
            "from the resumed weights",
            folder.name,
        )
        return
    ema.load_state_dict(load_file(str(path)))

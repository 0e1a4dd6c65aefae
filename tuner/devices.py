"""One way to place modules on a device for a phase (caching, class generation, sampling):
diffusers' `offload_models`, which moves modules there and back to where each was, plus the
cache release that makes the memory usable by the next phase."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from diffusers.training_utils import offload_models


@contextlib.contextmanager
def on_device(modules: Iterable[torch.nn.Module | None], device) -> Iterator[None]:
    """Run a phase with `modules` on `device`; each goes back where it was afterwards."""
    present = [m for m in modules if m is not None and next(m.parameters(), None) is not None]
    device = torch.device(device)
    try:
        with offload_models(*present, device=device, offload=bool(present)):
            yield
    finally:
        release(device)


def place(modules: Iterable[torch.nn.Module | None], device) -> None:
    """Move modules for the rest of the run (e.g. encoders whose outputs are cached stay on
    the CPU while training)."""
    for module in modules:
        if module is not None:
            module.to(device)
    release(torch.device(device))


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

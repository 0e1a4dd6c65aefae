"""Builtin models (`builtin:NAME`), built from config with seeded random init, in one table.

tiny-*: real architectures at toy size, for tests: every code path (loading, LoRA, caching,
sampling, export) runs on a CPU in seconds; they draw noise. arch-*: the real architecture at
full size, random init, for speed and memory benchmarks (same FLOPs and bytes as the released
weights). Other packages add builtins through the `tuner.builtins` entry point group (the toy
world adds `builtin:toy`, a small model it trained), so nothing here imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points

PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    family: str
    build: Callable[[], dict]  # -> the pipeline's modules as keyword arguments


def lazy(module: str, function: str, *args) -> Callable[[], dict]:
    """A builder imported only when its builtin is used."""

    def build() -> dict:
        return getattr(importlib.import_module(module), function)(*args)

    return build


TABLE: dict[str, Builtin] = {
    "tiny-sd15": Builtin("sd15", lazy("tuner.builtins.sd", "build_tiny_sd", "sd15")),
    "tiny-sd2": Builtin("sd2", lazy("tuner.builtins.sd", "build_tiny_sd", "sd2")),
    "arch-sd15": Builtin("sd15", lazy("tuner.builtins.sd", "build_arch_sd15")),
    "arch-sd2": Builtin("sd2", lazy("tuner.builtins.sd", "build_arch_sd2")),
    "tiny-sdxl": Builtin("sdxl", lazy("tuner.builtins.sdxl", "build_tiny_sdxl")),
    "arch-sdxl": Builtin("sdxl", lazy("tuner.builtins.sdxl", "build_arch_sdxl")),
    "tiny-sd3": Builtin("sd3", lazy("tuner.builtins.sd3", "build_tiny_sd3")),
    "arch-sd35": Builtin("sd3", lazy("tuner.builtins.sd3", "build_arch_sd35")),
    "tiny-flux": Builtin("flux", lazy("tuner.builtins.flux", "build_tiny_flux")),
    "arch-flux-dev": Builtin("flux", lazy("tuner.builtins.flux", "build_arch_flux", "dev")),
    "tiny-flux-kontext": Builtin(
        "flux-kontext", lazy("tuner.builtins.flux", "build_tiny_flux_kontext")
    ),
    "arch-flux-kontext": Builtin(
        "flux-kontext", lazy("tuner.builtins.flux", "build_arch_flux_kontext")
    ),
    "tiny-chroma": Builtin("chroma", lazy("tuner.builtins.chroma", "build_tiny_chroma")),
    "arch-chroma": Builtin("chroma", lazy("tuner.builtins.chroma", "build_arch_chroma")),
    "tiny-qwen-image": Builtin(
        "qwen-image", lazy("tuner.builtins.qwen_image", "build_tiny_qwen_image")
    ),
    "arch-qwen-image": Builtin(
        "qwen-image", lazy("tuner.builtins.qwen_image", "build_arch_qwen_image")
    ),
    "tiny-qwen-image-edit": Builtin(
        "qwen-image-edit", lazy("tuner.builtins.qwen_image_edit", "build_tiny_qwen_image_edit")
    ),
    # the same modules under QwenImageEditPlusPipeline (told apart by "plus" in the name)
    "tiny-qwen-image-edit-plus": Builtin(
        "qwen-image-edit", lazy("tuner.builtins.qwen_image_edit", "build_tiny_qwen_image_edit")
    ),
    "arch-qwen-image-edit": Builtin(
        "qwen-image-edit", lazy("tuner.builtins.qwen_image_edit", "build_arch_qwen_image_edit")
    ),
    "tiny-z-image": Builtin("z-image", lazy("tuner.builtins.z_image", "build_tiny_z_image")),
    "arch-z-image": Builtin("z-image", lazy("tuner.builtins.z_image", "build_arch_z_image")),
    "tiny-flux2-dev": Builtin("flux2", lazy("tuner.builtins.flux2", "build_tiny_flux2_dev")),
    "tiny-flux2-klein": Builtin("flux2", lazy("tuner.builtins.flux2", "build_tiny_flux2_klein")),
    "arch-flux2-dev": Builtin("flux2", lazy("tuner.builtins.flux2", "build_arch_flux2", "dev")),
    "arch-flux2-klein-4b": Builtin(
        "flux2", lazy("tuner.builtins.flux2", "build_arch_flux2", "klein-4b")
    ),
    "arch-flux2-klein-9b": Builtin(
        "flux2", lazy("tuner.builtins.flux2", "build_arch_flux2", "klein-9b")
    ),
    "tiny-hidream": Builtin("hidream", lazy("tuner.builtins.hidream", "build_tiny_hidream")),
    "arch-hidream": Builtin("hidream", lazy("tuner.builtins.hidream", "build_arch_hidream")),
}


@cache
def all_builtins() -> dict[str, Builtin]:
    """The table plus the builtins that installed plugins register."""
    found = dict(TABLE)
    for point in entry_points(group="tuner.builtins"):
        for name, builtin in point.load()().items():
            found[name] = builtin
    return found


def tiny_names() -> list[str]:
    return [name for name in TABLE if name.startswith("tiny-")]


def builtin_name(path: str) -> str | None:
    return path[len(PREFIX) :] if path.startswith(PREFIX) else None


def lookup(name: str) -> Builtin | None:
    """The table first: plugins are loaded only for names it does not hold."""
    return TABLE.get(name) or all_builtins().get(name)

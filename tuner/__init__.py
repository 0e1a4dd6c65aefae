"""tuner: LoRA and DreamBooth fine-tuning for diffusion models, driven by recipe files."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_recipe", "train", "load_pipeline", "load_adapter", "TunerError"]

from tuner.errors import TunerError
from tuner.recipe import load_recipe


def train(recipe):
    """Train a recipe (a Recipe, or a path to a YAML file); returns the output directory."""
    from tuner.training.run import train as _train

    if not hasattr(recipe, "train"):
        recipe = load_recipe(recipe)
    return _train(recipe)


def load_pipeline(model_path: str, family: str | None = None, dtype=None):
    """The diffusers pipeline for a hub id, a local folder, a single file or a builtin."""
    import torch

    from tuner import families
    from tuner.recipe import ModelSection

    model = ModelSection(path=model_path, family=family)
    fam = families.for_model(model)
    comps = fam.load(model, dtype or torch.float32)
    return fam.build_pipeline(comps)


def load_adapter(pipe, path, scale: float = 1.0, adapter_name: str = "adapter0") -> None:
    """Add a trained adapter (output dir or .safetensors: LoRA, LoHa or LoKr, either layout)
    to a diffusers pipeline at `scale`, the way `tuner sample` loads it. LoHa/LoKr go through
    peft directly: diffusers' load_lora_weights does not read them for these pipelines."""
    from pathlib import Path

    from tuner import families
    from tuner.inference.pipelines import (
        AdapterChoice,
        LoraSpec,
        activate,
        adapter_file,
        load_adapters,
    )

    found = [f for f in families.names() if families.get(f).spec.pipeline == type(pipe).__name__]
    if not found:
        raise TunerError(f"no tuner family uses {type(pipe).__name__}")
    family = families.get(found[0])
    spec = LoraSpec(adapter_file(path), scale, adapter_name, Path(path).name)
    load_adapters(pipe, family, [spec])
    activate(pipe, AdapterChoice(spec.label, [spec]))

"""tuner: LoRA and DreamBooth fine-tuning for diffusion models, driven by recipe files."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_recipe", "train", "load_pipeline", "TunerError"]

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

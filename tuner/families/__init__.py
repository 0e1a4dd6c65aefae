"""Model families. `get(name)` returns the family object; `for_model` picks one for a recipe."""

from __future__ import annotations

from tuner.errors import TunerError
from tuner.recipe import FAMILY_NAMES


def get(name: str):
    if name in ("sd15", "sd2"):
        from tuner.families.sd import StableDiffusionFamily

        return StableDiffusionFamily(name, 512 if name == "sd15" else 768)
    if name == "sdxl":
        from tuner.families.sdxl import SDXLFamily

        return SDXLFamily()
    if name == "sd3":
        from tuner.families.sd3 import SD3Family

        return SD3Family()
    if name == "flux":
        from tuner.families.flux import FluxFamily

        return FluxFamily()
    raise TunerError(f"unknown family {name!r}; expected one of {', '.join(FAMILY_NAMES)}")


def for_model(model):
    """The family named in the recipe, or the one detected from model.path."""
    from tuner.families.loading import detect_family

    return get(model.family or detect_family(model.path))

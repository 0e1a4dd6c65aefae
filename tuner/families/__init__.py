"""Model families, one file each. The registry is built from the family classes found in this
package: a new family is a new file here, nothing else in the code names it."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from tuner.errors import TunerError
from tuner.families.base import Components, Family, FamilyBase, FamilySpec

__all__ = ["Components", "Family", "FamilySpec", "for_model", "get", "known_for", "names"]

# Modules of this package that hold no family.
NOT_FAMILIES = {
    "base",
    "checks",
    "detection",
    "loading",
    "mmdit",
    "moe_trace",
    "quantize",
    "text_encoders",
    "chroma_file",
    "flux2_export",
    "fp8",
}


@cache
def registry() -> dict[str, type[FamilyBase]]:
    """Family name -> class, from every module of this package that defines one."""
    found: dict[str, type[FamilyBase]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            spec = getattr(value, "spec", None)
            if (
                isinstance(value, type)
                and isinstance(spec, FamilySpec)
                and value.__module__ == module.__name__
            ):
                if spec.name in found:
                    raise RuntimeError(f"two families are named {spec.name!r}")
                found[spec.name] = value
    return dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> Family:
    cls = registry().get(name)
    if cls is None:
        raise TunerError(f"unknown family {name!r}; expected one of {', '.join(names())}")
    return cls()


def for_model(model) -> Family:
    """The family named in the recipe, or the one detected from model.path."""
    from tuner.families.detection import detect_family

    if model.family:
        return named_family(model)
    return get(detect_family(model.path))


def named_family(model) -> Family:
    """model.family, checked against what model.path is where that is known offline (a
    builtin, a local folder or file): a mismatch is one line, never a half-loaded model."""
    from tuner.families.detection import detect_family
    from tuner.families.loading import source_kind

    family = get(model.family)
    if source_kind(model.path) == "hub":
        return family  # detecting a hub id needs the network; loading then fails on a mismatch
    try:
        detected = detect_family(model.path)
    except TunerError:
        return family  # not detectable: the recipe's word stands
    if detected != model.family:
        raise TunerError(
            f"model.family: {model.family} but {model.path} is a {detected} model; "
            f"set model.family: {detected} (or remove it)"
        )
    return family


def known_for(model) -> Family | None:
    """The family when it is known without the network (named, builtin, local folder or
    file); None for a hub id without model.family."""
    from tuner.families.detection import detect_family
    from tuner.families.loading import source_kind

    if model.family:
        return named_family(model)
    if source_kind(model.path) == "hub":
        return None
    return get(detect_family(model.path))

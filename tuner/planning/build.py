"""The recipe's model on the meta device: every component at its real size, no weights read.

A builtin is built by the family's own `load` under `torch.device("meta")`, so the components,
their dtypes (the SDXL VAE kept in fp32, ...) and the family's settings (Flux's T5 length) are
exactly the trainer's. A folder or hub id whose weights cannot be read without loading them is
planned on the family's full-size builtin (`builtin:arch-*`), the same architecture; the plan
says so. Quantization is accounted for by storage size (storage.py), not applied: bitsandbytes
quantizes only while loading onto a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuner import builtins, families
from tuner.errors import TunerError
from tuner.families.base import Components
from tuner.families.loading import source_kind
from tuner.recipe import Recipe
from tuner.training.run import DTYPES


@dataclass
class MetaModel:
    family: object
    comps: Components
    source: str  # what was built: the recipe's builtin, or the stand-in architecture
    note: str = ""  # why a stand-in was used


def arch_builtin(family_name: str, path: str = "") -> str | None:
    """The full-size builtin of a family (`arch-*`), if there is one; of several (Flux.2 dev,
    klein 4B / 9B), the one whose variant the path names."""
    found = [
        name
        for name, builtin in builtins.TABLE.items()
        if name.startswith("arch-") and builtin.family == family_name
    ]
    for name in found:
        variant = name.rsplit("-", 2)[-2:] if name.count("-") >= 3 else name.split("-")[-1:]
        if "-".join(variant) in path.lower():
            return name
    return found[0] if found else None


def meta_model(recipe: Recipe) -> MetaModel:
    kind = source_kind(recipe.model.path)
    family = families.known_for(recipe.model)
    if family is None and kind == "builtin":
        family = families.for_model(recipe.model)  # a builtin names its family: no loading
    if family is None:
        raise TunerError(
            f"plan: cannot tell the family of {recipe.model.path} without loading it; "
            "set model.family"
        )
    source, note = recipe.model.path, ""
    if kind != "builtin":
        stand_in = arch_builtin(family.spec.name, recipe.model.path)
        if stand_in is None:
            raise TunerError(
                f"plan: no full-size builtin of family {family.spec.name} to plan "
                f"{recipe.model.path} on; run the plan with model.path=builtin:NAME"
            )
        source = builtins.PREFIX + stand_in
        note = f"{recipe.model.path} planned as {source} (same architecture, no weights read)"
    # Quantization (of the base and of the text encoders) is counted by storage size; loading
    # stays the plain path (quantizing writes and reads real weights, which meta has not).
    plain = {"path": source, "quantize": "none", "text_encoder_quantize": "none"}
    model = recipe.model.model_copy(update=plain)
    planned = recipe.model_copy(update={"model": model})
    dtype = DTYPES[recipe.train.mixed_precision]
    try:
        with torch.device("meta"):
            comps = family.load(model, dtype)
            comps = family.configure(comps, planned)
    except (NotImplementedError, RuntimeError, ValueError):
        if kind != "builtin" or builtins.builtin_name(source) in builtins.TABLE:
            raise
        # A plugin builtin that reads its (small) weights, e.g. builtin:toy: built on the CPU,
        # then moved to meta.
        comps = family.configure(family.load(model, dtype), planned)
        for module in comps.modules().values():
            module.to("meta")
        note = note or f"{source} reads its weights: built on the CPU, then moved to meta"
    return MetaModel(family, comps, source, note)

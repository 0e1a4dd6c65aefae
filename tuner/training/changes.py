"""Resuming with a changed recipe: what may change, what may not.

A checkpoint records the resolved recipe it was trained with. On resume the new recipe is
compared with it, key by key:

- IDENTITY keys define the adapter (its shape, where it sits, what it is trained on top of) or
  the optimizer state's layout; changing one would load the old weights into a different
  adapter, or fail deep inside a library. Refused: one line naming each key and both values.
- Everything else (steps, lr and schedule, save/keep, sampling, logging, data settings...)
  applies from the resumed step on, with one notice listing what changed.
"""

from __future__ import annotations

from pathlib import Path

from tuner.errors import TunerError

IDENTITY = (
    "model.path",
    "model.family",
    "model.revision",
    "adapter.type",
    "adapter.rank",
    "adapter.alpha",
    "adapter.init",
    "adapter.dora",
    "adapter.targets",
    "adapter.target_regex",
    "adapter.text_encoder",
    "adapter.effective_conv",
    "adapter.decompose_both",
    "adapter.decompose_factor",
    "train.optimizer",
)
# Where the run is and how it was started, not what it trains.
IGNORED = ("train.resume", "output.overwrite", "output.dir")


def flatten(value, prefix: str = "") -> dict:
    """Dotted keys of a recipe dump; lists of mappings (data.datasets) are indexed, lists of
    plain values are one value."""
    flat = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else key))
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        for index, inner in enumerate(value):
            flat.update(flatten(inner, f"{prefix}.{index}"))
    else:
        flat[prefix] = value
    return flat


def show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every key that differs, in recipe order."""
    old, new = flatten(saved), flatten(current)
    # An unset alpha follows the rank: compare the alpha in effect when either side sets it
    # (when neither does, the rank's change is the one to name).
    if old.get("adapter.alpha") is not None or new.get("adapter.alpha") is not None:
        for flat, dump in ((old, saved), (new, current)):
            adapter = dump.get("adapter") or {}
            alpha = adapter.get("alpha")
            flat["adapter.alpha"] = float(alpha if alpha is not None else adapter.get("rank"))
    keys = list(new) + [k for k in old if k not in new]
    return [
        (key, old.get(key), new.get(key))
        for key in keys
        if key not in IGNORED and old.get(key) != new.get(key)
    ]


def check_resume(recipe, state: dict, checkpoint: Path) -> str | None:
    """Refuse identity changes; return the notice listing the other changes (None if none)."""
    saved = state.get("recipe")
    if not saved:
        return None  # a checkpoint from before recipes were recorded: nothing to compare
    changed = differences(saved, recipe.model_dump(mode="json"))
    fixed = [c for c in changed if c[0] in IDENTITY]
    if fixed:
        was = " and ".join(f"{key}={show(old)}" for key, old, _ in fixed)
        now = " and ".join(f"{key}={show(new)}" for key, _, new in fixed)
        raise TunerError(
            f"train.resume: {checkpoint} was trained with {was}, this recipe has {now}; "
            "a resumed run keeps its adapter, base model and optimizer: set it back, or "
            "start a new run in another output.dir"
        )
    if not changed:
        return None
    listed = ", ".join(f"{key} {show(old)} -> {show(new)}" for key, old, new in changed)
    run = f"run {state['run_id']} " if state.get("run_id") else ""
    return f"resuming {run}at step {state['step']} with changed settings: {listed}"


def data_notice(saved: dict | None, current: dict, checkpoint: Path) -> str | None:
    if not saved or saved.get("sha256") == current["sha256"]:
        return None
    return (
        f"data changed since {checkpoint} ({saved['images']} images then, "
        f"{current['images']} now); training continues on the current data"
    )

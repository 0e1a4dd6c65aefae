"""Subcommands beyond train/check (sample, grid, export, merge, eval, bench, toy) register here."""

from __future__ import annotations


def register(sub) -> None:
    """Each tool module adds its own subparser; missing modules are simply not offered."""
    import importlib

    for name in (
        "tuner.tools.sample_cmd",
        "tuner.tools.export_cmd",
        "tuner.tools.eval_cmd",
        "tuner.tools.bench_cmd",
        "tuner.tools.toy_cmd",
    ):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)

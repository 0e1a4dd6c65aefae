"""Command line: `tuner train|check|sample|grid|export|merge|eval ...`.

User mistakes (TunerError) print one line and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from tuner.errors import TunerError


def _quiet_libraries() -> None:
    # Library chatter (deprecations, "kernels not installed") buries the lines users need.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_train(args) -> int:
    from tuner.recipe import load_recipe
    from tuner.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    output = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: adapter and samples in {output}")
    return 0


def cmd_check(args) -> int:
    from tuner.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuner", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe: tuner train RECIPE [key=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, or ~section.key to remove")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="validate a recipe and print it resolved (loads no model)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_check)

    from tuner import commands

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not debug:
        _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TunerError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

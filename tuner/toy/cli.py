"""`tuner toy ...`: the toy world's own tools, under the main command.

tuner toy train-base --out tuner/toy/weights/base   # the builtin:toy base model
tuner toy train-edit-base --out tuner/toy/weights/edit   # builtin:toy-edit (Kontext-style)
tuner toy eval-edit --lora RUN --scales 0 1          # editing LoRA: applied / kept, by the judge
tuner toy sample --model ... --prompt "a red circle on a blue background" --out x.png
tuner toy score --model ... --n 64                   # judge accuracy of a base model
tuner toy judge train|eval                           # the judge classifier
tuner toy world render-datasets datasets/            # the shipped datasets
"""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module whose main() takes the rest of the line, argv prefix)
TOOLS = {
    "train-base": ("tuner.toy.base", ["train"]),
    "train-edit-base": ("tuner.toy.edit_base", []),
    "eval-edit": ("tuner.toy.edit_eval", []),
    "sample": ("tuner.toy.base", ["sample"]),
    "score": ("tuner.toy.score", []),
    "judge": ("tuner.toy.judge", []),
    "world": ("tuner.toy.world", []),
}


def register(sub) -> None:
    """The toy world's command groups (`tuner toy`, `tuner eval`), added through the
    `tuner.commands` entry point: the product itself never imports the toy world."""
    from tuner.toy import evaluation

    evaluation.register(sub)
    p = sub.add_parser(
        "toy",
        help="toy world tools: train-base, train-edit-base, eval-edit, sample, score, judge, world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("tool", choices=sorted(TOOLS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own arguments (--help)")
    p.set_defaults(func=cmd_toy)


def cmd_toy(args) -> int:
    module_name, prefix = TOOLS[args.tool]
    module = importlib.import_module(module_name)
    module.main([*prefix, *args.rest])
    return 0

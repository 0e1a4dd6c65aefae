"""`tuner train RECIPE [k=v ...]` and `tuner check RECIPE [k=v ...]`."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("train", help="train a recipe: tuner train RECIPE [key=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, or ~section.key to remove")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="validate a recipe and print it resolved (loads no model)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_check)


def cmd_train(args) -> int:
    from tuner.recipe import load_recipe
    from tuner.training.run import train

    recipe = load_recipe(args.recipe, args.overrides)
    if os.environ.get("RANK", "0") == "0":
        from tuner.cli.plan import family_checks, train_preflight

        family_checks(recipe)  # a refusal comes first, before the plan builds anything
        train_preflight(recipe)  # one line; a warning when the GPU is too small
    output = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: adapter and samples in {output}")
    return 0


def cmd_check(args) -> int:
    from tuner import families
    from tuner.recipe import load_recipe
    from tuner.training.optim import check_optimizer

    recipe = load_recipe(args.recipe, args.overrides)
    # The family's own checks, whenever the family is known without the network.
    family = families.known_for(recipe.model)
    if family is not None:
        family.validate(recipe)
    check_optimizer(recipe.train, recipe.adapter)
    print(recipe.to_yaml(), end="")
    return 0

"""`tuner plan RECIPE [k=v ...]`: predicted GPU memory per phase, card verdicts, FLOPs, time.

Loads no weights: every component is built on the meta device (tuner/planning).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("tuner")
GiB = 2**30


def register(sub) -> None:
    p = sub.add_parser("plan", help="predict a recipe's GPU memory and step time (no weights)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, or ~section.key to remove")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--tflops", type=float, default=None, help="sustained TFLOP/s for the time estimate"
    )
    p.add_argument(
        "--as-flop-counted",
        action="store_true",
        help="predict what `tuner bench --count-flops` measures (its counted step keeps "
        "checkpointed activations alive)",
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from tuner.planning import make_plan
    from tuner.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    family_checks(recipe)
    plan = make_plan(recipe, tflops=args.tflops, as_flop_counted=args.as_flop_counted)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(render(plan))
    return 0


def family_checks(recipe) -> None:
    from tuner import families

    family = families.known_for(recipe.model)
    if family is not None:
        family.validate(recipe)


def render(plan) -> str:
    def gib(n: float) -> str:
        return f"{n / GiB:8.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:8.1f} MiB"

    lines = [f"{plan.model} ({plan.family}) at {plan.resolution}px"]
    if plan.note:
        lines.append(f"  note: {plan.note}")
    lines.append("  component         params       stored")
    for name, c in plan.components.items():
        lines.append(f"  {name:16s} {c['params'] / 1e6:9.1f}M {gib(c['bytes'])}  {c['kind']}")
    lines += [
        f"  LoRA             {plan.lora_params / 1e6:9.2f}M {gib(plan.lora_bytes)}  fp32",
        f"  gradients                   {gib(plan.gradient_bytes)}  fp32 (LoRA only)",
        f"  optimizer state             {gib(plan.optimizer_bytes)}  {plan.settings['optimizer']}",
        f"  activations                 {gib(plan.activation_bytes)}  one micro-step, traced",
        "  phase peaks (allocated):",
    ]
    for phase, peak in plan.phases.items():
        mark = "  <- peak" if phase == plan.peak_phase else ""
        lines.append(f"    {phase:12s}            {gib(peak)}{mark}")
    lines.append("  cards:")
    for gb, verdict in plan.cards.items():
        lines.append(f"    {gb:>3s} GB  {verdict}")
    if plan.flops_per_step:
        time = (
            f", {plan.seconds_per_step:.2f} s/step at {plan.tflops:g} TFLOP/s"
            if plan.seconds_per_step
            else " (--tflops N for a time estimate)"
        )
        lines.append(f"  FLOPs per optimizer step: {plan.flops_per_step / 1e12:.4g} T{time}")
    return "\n".join(lines)


def train_preflight(recipe) -> None:
    """The plan's one line before training, and a warning when the predicted peak exceeds the
    visible GPU. Never stops a run: a source the plan cannot read is named in one line."""
    import torch

    from tuner.errors import TunerError
    from tuner.planning import make_plan

    try:
        plan = make_plan(recipe, flops=False, switches=False)
    except (TunerError, RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        log.info("plan: not available for %s (%s)", recipe.model.path, first)
        return
    log.info("%s", plan.summary())
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        if plan.peak_bytes > total:
            log.warning(
                "plan: the predicted peak %.1f GiB (%s) exceeds this GPU's %.1f GiB; "
                "`tuner plan %s` lists the switches that make it fit",
                plan.peak_bytes / GiB,
                plan.peak_phase,
                total / GiB,
                recipe._source or "RECIPE",
            )

"""What `tuner eval` measures: the toy judge reads samples of the base model and of base + adapter,
and each metric is a fraction of samples whose judged labels match what the prompt asked for.

The adapter's target comes from its training captions: a style trigger word (world.STYLE_TRIGGERS)
means a style adapter, a subject token (world.SUBJECTS) a subject adapter, whose class (the
subject's shape, or the shape named by dreambooth.class_prompt) is the prior to preserve.

Prompt groups, each rendered at every seed, once at scale 0 (the base) and once with the adapter:
- style:   base-world captions plus the trigger word          -> style_strength
- subject: the instance prompt on varied backgrounds          -> subject_fidelity
- class:   the class prompt on varied backgrounds             -> prior_preservation
- base:    plain base-world captions, no trigger              -> base_retention
- open:    the instance prompt with no background named       -> background_retention
prompt_fidelity counts style and subject samples whose named parts (shape, colour, background)
all match the prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from tuner.data.captions import process_caption
from tuner.toy import world

METRICS = ("style_strength", "subject_fidelity", "prompt_fidelity", "prior_preservation",
           "base_retention", "background_retention")  # fmt: skip
EMBED_METRICS = ("clip_t", "clip_i", "dino")
GROUPS = ("style", "subject", "class", "base", "open")
PROMPT_SEED = 9_000_000  # prompts come from their own streams: --seeds only changes the noise
SEED_STRIDE = 100_003  # noise seed = seed * stride + prompt index: distinct across both
RETAINED = ("shape", "color", "background")  # what base retention compares


@dataclass(frozen=True)
class Target:
    """What the adapter was trained to draw, read from its recipe and training captions."""

    style: str | None = None
    subject: str | None = None
    class_shape: str | None = None  # the DreamBooth class whose prior should survive
    style_affix: tuple[str, str] = ("", "")  # the dataset's prefix/suffix, as in training
    subject_affix: tuple[str, str] = ("", "")
    instance_prompt: str | None = None
    class_prompt: str | None = None


@dataclass
class Sample:
    group: str
    index: int  # the prompt's place in its group
    prompt: str
    seed: int
    adapter: bool  # False: scale 0, the base model
    image: Image.Image | None = field(default=None, repr=False)
    labels: dict[str, str] | None = None


# --- the target ------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.replace(",", " ").split()


def find_target(recipe, items) -> Target:
    """The most frequent style trigger and subject token in the training captions (the data
    pipeline's items: caption as trained, with the prefix/suffix its dataset added)."""
    styles: Counter[str] = Counter()
    subjects: Counter[str] = Counter()
    affix: dict[str, tuple[str, str]] = {}
    triggers = {trigger: style for style, trigger in world.STYLE_TRIGGERS.items()}
    tokens = {subject.token: name for name, subject in world.SUBJECTS.items()}
    for item in items:
        for word in words(item.caption):
            if word in triggers:
                styles[triggers[word]] += 1
                affix.setdefault(triggers[word], (item.prefix, item.suffix))
            elif word in tokens:
                subjects[tokens[word]] += 1
                affix.setdefault(tokens[word], (item.prefix, item.suffix))
    style = styles.most_common(1)[0][0] if styles else None
    subject = subjects.most_common(1)[0][0] if subjects else None
    db = recipe.dreambooth
    class_prompt = db.class_prompt if db is not None else None
    named = [w for w in words(class_prompt or "") if w in world.SHAPES]
    class_shape = named[0] if named else world.SUBJECTS[subject].shape if subject else None
    instance = db.instance_prompt if db is not None else None
    if subject is None or (instance and world.SUBJECTS[subject].token not in words(instance)):
        instance = None  # a DreamBooth prompt that does not name the subject is no template
    return Target(
        style=style,
        subject=subject,
        class_shape=class_shape,
        style_affix=affix.get(style, ("", "")),
        subject_affix=affix.get(subject, ("", "")),
        instance_prompt=instance,
        class_prompt=class_prompt,
    )


# --- prompts and samples ---------------------------------------------------------------------


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def with_background(prompt: str, background: str) -> str:
    """Place a prompt on a background unless it already names one."""
    if "background" in words(prompt):
        return prompt
    return f"{prompt} on {article(background)} background"


def with_affix(prompt: str, affix: tuple[str, str]) -> str:
    return process_caption(prompt, prefix=affix[0], suffix=affix[1], rng=random.Random(0))


def group_prompts(target: Target, n: int) -> dict[str, list[str]]:
    """n prompts per group that applies to this target, each group from its own stream."""

    def specs(group: str, **constraints) -> list[world.Spec]:
        rng = np.random.default_rng([PROMPT_SEED, GROUPS.index(group)])
        return [world.sample_spec(rng, **constraints) for _ in range(n)]

    prompts: dict[str, list[str]] = {}
    if target.style:
        trigger = world.STYLE_TRIGGERS[target.style]
        prompts["style"] = []
        for spec in specs("style"):
            prompt = with_affix(world.caption(spec), target.style_affix)
            if trigger not in words(prompt):
                prompt = f"{prompt}, {trigger}"
            prompts["style"].append(prompt)
    if target.subject:
        subject = world.SUBJECTS[target.subject]
        template = target.instance_prompt or article(f"{subject.token} {subject.shape}")
        prompts["subject"] = [
            with_affix(with_background(template, spec.background), target.subject_affix)
            for spec in specs("subject", subject=target.subject)
        ]
    if target.class_shape:
        template = target.class_prompt or article(target.class_shape)
        prompts["class"] = [
            with_background(template, spec.background)
            for spec in specs("class", shape=target.class_shape)
        ]
    prompts["base"] = [world.caption(spec) for spec in specs("base")]
    if target.subject:  # the background is the model's choice: does it stay the base's?
        subject = world.SUBJECTS[target.subject]
        template = target.instance_prompt or article(f"{subject.token} {subject.shape}")
        if "background" not in words(template):
            prompts["open"] = [with_affix(template, target.subject_affix)] * n
    return prompts


def plan_samples(target: Target, n: int, seeds: list[int]) -> list[Sample]:
    """Every (group, prompt, seed) once without and once with the adapter, same noise."""
    samples = []
    for group, prompts in group_prompts(target, n).items():
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                for adapter in (False, True):
                    samples.append(
                        Sample(group, index, prompt, seed * SEED_STRIDE + index, adapter)
                    )
    return samples


def prompt_parts(prompt: str) -> dict[str, str]:
    """The world labels a prompt names: shape, the colour just before it, the background."""
    tokens = words(prompt)
    parts = {}
    for i, word in enumerate(tokens):
        if word in world.SHAPES and "shape" not in parts:
            parts["shape"] = word
            if i > 0 and tokens[i - 1] in world.COLORS:
                parts["color"] = tokens[i - 1]
        elif word == "background" and i > 0 and tokens[i - 1] in world.BACKGROUNDS:
            parts["background"] = tokens[i - 1]
    return parts


# --- the metrics -----------------------------------------------------------------------------


def fraction(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _rate(samples: list[Sample], group: str, test) -> tuple[float, dict]:
    """A metric over one group: the adapter's rate, with the base's for comparison."""
    after = [test(s) for s in samples if s.group == group and s.adapter]
    before = [test(s) for s in samples if s.group == group and not s.adapter]
    detail = {
        "matched": sum(after),
        "total": len(after),
        "base": fraction(before),
        "prompts": unique_prompts(samples, group),
    }
    return fraction(after), detail


def unique_prompts(samples: list[Sample], group: str) -> list[str]:
    return list(dict.fromkeys(s.prompt for s in samples if s.group == group))


def prompt_matches(sample: Sample) -> dict[str, bool]:
    return {part: sample.labels[part] == want for part, want in prompt_parts(sample.prompt).items()}


def prompt_fidelity(samples: list[Sample]) -> tuple[float | None, dict]:
    named = [s for s in samples if s.group in ("style", "subject")]
    after = [prompt_matches(s) for s in named if s.adapter]
    before = [prompt_matches(s) for s in named if not s.adapter]
    parts = {
        part: fraction([m[part] for m in after if part in m])
        for part in ("shape", "color", "background")
    }
    detail = {
        "matched": sum(all(m.values()) for m in after),
        "total": len(after),
        "base": fraction([all(m.values()) for m in before]),
        "parts": {part: rate for part, rate in parts.items() if rate is not None},
    }
    return fraction([all(m.values()) for m in after]), detail


def prior_preservation(samples: list[Sample], class_shape: str) -> tuple[float, dict]:
    """Class prompts should still give a plain member of the class: the class's shape and no
    subject (a class prompt that draws the subject is the language drift prior loss prevents)."""

    def is_class(s: Sample) -> bool:
        return s.labels["shape"] == class_shape and s.labels["subject"] == "none"

    def distribution(adapter: bool) -> dict[str, dict[str, int]]:
        picked = [s.labels for s in samples if s.group == "class" and s.adapter == adapter]
        return {
            head: dict(sorted(Counter(labels[head] for labels in picked).items()))
            for head in ("shape", "subject")
        }

    value, detail = _rate(samples, "class", is_class)
    detail["class"] = class_shape
    detail["drop"] = round(detail["base"] - value, 6)
    detail["before"], detail["after"] = distribution(False), distribution(True)
    return value, detail


def base_retention(samples: list[Sample]) -> tuple[float | None, dict]:
    """Unrelated prompts: the same judged shape, colour and background with and without the
    adapter, at the same seed."""
    base = {(s.index, s.seed): s.labels for s in samples if s.group == "base" and not s.adapter}
    same = [
        all(s.labels[h] == base[(s.index, s.seed)][h] for h in RETAINED)
        for s in samples
        if s.group == "base" and s.adapter
    ]
    detail = {"matched": sum(same), "total": len(same), "compared": list(RETAINED),
              "prompts": unique_prompts(samples, "base")}  # fmt: skip
    return fraction(same), detail


def background_retention(samples: list[Sample]) -> tuple[float | None, dict]:
    """Subject prompts that name no background: the judged background is the base model's at
    the same noise (a subject adapter should not also learn its photos' backgrounds)."""
    base = {(s.index, s.seed): s.labels for s in samples if s.group == "open" and not s.adapter}
    after = [s for s in samples if s.group == "open" and s.adapter]
    same = [s.labels["background"] == base[(s.index, s.seed)]["background"] for s in after]

    def distribution(adapter: bool) -> dict[str, int]:
        picked = [
            s.labels["background"] for s in samples if s.group == "open" and s.adapter == adapter
        ]
        return dict(sorted(Counter(picked).items()))

    detail = {"matched": sum(same), "total": len(same), "prompts": unique_prompts(samples, "open"),
              "before": distribution(False), "after": distribution(True)}  # fmt: skip
    return fraction(same), detail


def score(samples: list[Sample], target: Target) -> dict:
    """{metric: value or None, ..., "details": {...}} from judged samples."""
    report: dict = dict.fromkeys(METRICS + EMBED_METRICS)
    details: dict = {"target": asdict(target)}
    if target.style:
        report["style_strength"], details["style_strength"] = _rate(
            samples, "style", lambda s: s.labels["style"] == target.style
        )
    if target.subject:
        report["subject_fidelity"], details["subject_fidelity"] = _rate(
            samples, "subject", lambda s: s.labels["subject"] == target.subject
        )
    if target.style or target.subject:
        report["prompt_fidelity"], details["prompt_fidelity"] = prompt_fidelity(samples)
    if target.class_shape:
        report["prior_preservation"], details["prior_preservation"] = prior_preservation(
            samples, target.class_shape
        )
    report["base_retention"], details["base_retention"] = base_retention(samples)
    if any(s.group == "open" for s in samples):
        report["background_retention"], details["background_retention"] = background_retention(
            samples
        )
    report["details"] = details
    return report

"""Quality gates on the committed toy base model (builtin:toy), judged by the toy judge.

These run the shipped quickstart recipes as a user would (same recipe files, only the output
and cache folders moved into tmp) and pin what they must achieve. Thresholds are the issue's
gates; the values measured when they were pinned are in docs/TOY.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tuner.cli import main
from tuner.recipe import load_recipe
from tuner.toy import world

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # minutes of CPU training: the slow tier (./launch.sh test --slow)
EVAL = ["--n", "16", "--seeds", "0", "1"]  # 32 judged samples per prompt group


def run_quickstart(name: str, folder: Path, *overrides: str) -> Path:
    from tuner.training.run import train

    recipe = load_recipe(
        REPO / "recipes" / name,
        [f"output.dir={folder / 'out'}", f"data.cache_dir={folder / 'cache'}", *overrides],
    )
    return train(recipe)


def eval_report(output: Path) -> dict:
    """`tuner eval OUTPUT_DIR`, read back from the eval.json it writes."""
    assert main(["eval", str(output), *EVAL]) == 0
    return json.loads((output / "eval" / "eval.json").read_text())


@pytest.fixture(scope="module")
def base_pipe():
    from tuner.toy.base import load_toy_modules, make_pipeline

    return make_pipeline(**load_toy_modules())


def test_base_model_draws_what_base_prompts_ask_for(base_pipe):
    from tuner.toy.base import sample_images
    from tuner.toy.judge import load_judge, spec_labels

    rng = np.random.default_rng([32, 99])
    specs = [world.sample_spec(rng) for _ in range(32)]
    images = []
    for seed, spec in enumerate(specs):  # 32 seeds, one prompt each
        images += sample_images(base_pipe, [world.caption(spec)], seed=seed, steps=25)
    judged = load_judge().predict(images)
    rates = {
        head: float(np.mean([j[head] == spec_labels(s)[head] for j, s in zip(judged, specs)]))
        for head in ("shape", "color", "background")
    }
    print("gate base:", rates)  # shown with pytest -rP: the values the note reports
    assert all(rate >= 0.8 for rate in rates.values()), rates


def test_base_model_draws_a_red_circle_on_blue(base_pipe):
    """The issue's own example prompt, at 8 seeds: the judge reads what it asks for (measured 8 of
    8; one miss is allowed for other CPUs' rounding)."""
    from tuner.toy.base import sample_images
    from tuner.toy.judge import load_judge

    images = []
    for seed in range(8):
        images += sample_images(
            base_pipe, ["a red circle on a blue background"], seed=seed, steps=25
        )
    judged = [(j["shape"], j["color"], j["background"]) for j in load_judge().predict(images)]
    print("gate red circle on blue:", judged)
    assert judged.count(("circle", "red", "blue")) >= 7, judged


@pytest.fixture(scope="module")
def style_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("style")
    return eval_report(run_quickstart("quickstart.yaml", folder))


def test_style_quickstart_learns_its_style_only_when_applied(style_report):
    report = style_report
    strength = report["details"]["style_strength"]
    print("gate style:", report["style_strength"], "at scale 0:", strength["base"])
    assert report["details"]["target"]["style"] == "outline"  # read from the training captions
    assert report["style_strength"] >= 0.8, strength
    assert strength["base"] <= 0.2, strength  # scale 0: the base model draws solid shapes


@pytest.fixture(scope="module")
def dreambooth_reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dreambooth")
    with_prior = run_quickstart("quickstart-dreambooth.yaml", folder / "prior")
    without = run_quickstart(
        "quickstart-dreambooth.yaml", folder / "plain", "dreambooth.with_prior_preservation=false"
    )
    return eval_report(with_prior), eval_report(without)


def test_dreambooth_quickstart_learns_the_subject_and_keeps_the_prompt(dreambooth_reports):
    report = dreambooth_reports[0]
    print("gate dreambooth:", report["subject_fidelity"], report["prompt_fidelity"])
    assert report["subject_fidelity"] >= 0.8, report["details"]["subject_fidelity"]
    assert report["prompt_fidelity"] >= 0.7, report["details"]["prompt_fidelity"]


def test_prior_preservation_keeps_the_class(dreambooth_reports):
    with_prior, without = (r["details"]["prior_preservation"] for r in dreambooth_reports)
    print("gate prior drop:", with_prior["drop"], "without prior preservation:", without["drop"])
    assert with_prior["drop"] <= 0.10, with_prior
    assert without["drop"] > with_prior["drop"], (without, with_prior)


# --- editing: builtin:toy-edit and the hollow edit LoRA -------------------------------------


@pytest.fixture(scope="module")
def edit_reports(tmp_path_factory):
    """The base editing model's own edits, and recipes/toy-edit-hollow.yaml's LoRA judged at
    scale 0 and 1 through `tuner toy eval-edit`'s function (diffusers' load_lora_weights)."""
    from tuner.inference.pipelines import load_adapters, load_base, lora_specs
    from tuner.toy.edit_eval import edit_metrics
    from tuner.toy.judge import load_judge

    judge = load_judge()
    family, pipe = load_base("builtin:toy-edit")
    base = {
        text: edit_metrics(pipe, judge, instruction=text, style="solid", scales=[0.0])["0"]
        for text in ("keep it", "make it purple")
    }
    output = run_quickstart("toy-edit-hollow.yaml", tmp_path_factory.mktemp("hollow"))
    load_adapters(pipe, family, lora_specs([str(output)]))
    edits = edit_metrics(pipe, judge, scales=[0.0, 1.0])
    print(json.dumps({"base": base, "hollow": edits}, indent=1))
    return base, edits


def test_edit_base_follows_instructions_it_was_trained_on(edit_reports):
    base, _ = edit_reports
    assert base["keep it"]["kept"] >= 0.8  # a copy of the reference
    assert base["make it purple"]["kept_shape"] >= 0.8  # recoloured, same shape


def test_hollow_edit_is_applied_only_with_the_lora_and_keeps_the_rest(edit_reports):
    """Measured when pinned (docs/TOY.md): scale 1 applied 0.94, kept 0.72 (shape 1.00, colour
    0.72, background 1.00); scale 0 applied 0.06, kept 0.19 (the base reads "make it hollow"
    like "make it <colour>" and recolours)."""
    _, edits = edit_reports
    assert edits["1"]["applied"] >= 0.8
    assert edits["1"]["kept"] >= 0.6 and edits["1"]["kept_shape"] >= 0.9
    assert edits["1"]["kept_background"] >= 0.9
    assert edits["0"]["applied"] <= 0.2  # the base does not know the edit
    assert edits["1"]["kept"] > edits["0"]["kept"]  # the LoRA keeps more than the base does

"""`tuner eval` on a tiny style adapter (2 steps on builtin:tiny-sd15, trained once per module).

builtin:tiny-sd15 draws noise, so these tests pin structure, determinism and the metric
arithmetic (with a stubbed judge), not quality. Output dirs for a DreamBooth run and for a
style + subject run reuse the trained adapter beside their own recipe.yaml: eval reads only
the recipe and the adapter, and any SD adapter is a valid one to judge.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.cli import main
from tuner.recipe import validate_recipe
from tuner.toy import world
from tuner.toy.metrics import EMBED_METRICS, METRICS

REPO = Path(__file__).resolve().parents[2]
STYLE_SET = REPO / "datasets" / "toy-stripes"
SUBJECT_SET = REPO / "datasets" / "toy-subject"
FAST = ["--n", "2", "--steps", "1"]


def base_raw(root: Path) -> dict:
    return {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4, "alpha": 4},
        "data": {
            "datasets": [{"path": str(STYLE_SET)}],
            "resolution": 64,
            "cache_dir": str(root / "cache"),
        },
        "train": {"steps": 2, "lr": 1e-2, "batch_size": 2},
        "sample": {"prompts": [], "steps": 2},
        "output": {"dir": str(root / "style")},
    }


DREAMBOOTH = {
    "instance_dir": str(SUBJECT_SET),
    "instance_prompt": "a sks circle",
    "class_prompt": "a circle",
    "num_class_images": 2,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def style_run(root) -> Path:
    from tuner.training.run import train

    torch.set_num_threads(1)
    return train(validate_recipe(base_raw(root)))


def output_dir_like(style_run: Path, folder: Path, raw: dict) -> Path:
    """An output dir with the trained adapter and another recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(style_run / "pytorch_lora_weights.safetensors", folder)
    raw["output"]["dir"] = str(folder)
    (folder / "recipe.yaml").write_text(validate_recipe(raw).to_yaml())
    return folder


@pytest.fixture(scope="module")
def dreambooth_run(style_run, root) -> Path:
    raw = base_raw(root)
    raw["data"]["datasets"] = []
    raw["dreambooth"] = dict(DREAMBOOTH)
    return output_dir_like(style_run, root / "dreambooth", raw)


@pytest.fixture(scope="module")
def both_run(style_run, root) -> Path:
    raw = base_raw(root)
    raw["dreambooth"] = dict(DREAMBOOTH)
    return output_dir_like(style_run, root / "both", raw)


def eval_json(capsys, folder: Path, *flags: str) -> dict:
    assert main(["eval", str(folder), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def in_unit(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


# --- reports ---------------------------------------------------------------------------------


def test_style_run_report(style_run, capsys):
    report = eval_json(capsys, style_run, *FAST)
    assert list(report) == [*METRICS, *EMBED_METRICS, "details"]
    for metric in ("style_strength", "prompt_fidelity", "base_retention"):
        assert in_unit(report[metric]), metric
    for metric in ("subject_fidelity", "prior_preservation", *EMBED_METRICS):
        assert report[metric] is None, metric
    details = report["details"]
    assert details["target"]["style"] == "stripes"
    style_prompts = details["style_strength"]["prompts"]
    assert len(style_prompts) == 2 and all(p.endswith(", zebrastyle") for p in style_prompts)
    assert not any("zebrastyle" in p for p in details["base_retention"]["prompts"])
    assert details["style_strength"]["total"] == 2 and in_unit(details["style_strength"]["base"])
    # What was printed is what was written; the grid holds 2 groups x 2 rows x 2 columns.
    assert json.loads((style_run / "eval" / "eval.json").read_text()) == report
    grid = Image.open(style_run / "eval" / "grid.png")
    assert grid.width >= 2 * 96 and grid.height >= 4 * 96


def test_plain_output_names_every_metric(style_run, capsys):
    assert main(["eval", str(style_run), *FAST]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((style_run / "eval" / "eval.json").read_text())
    lines = dict(line.split(maxsplit=1) for line in printed[: len(METRICS)])
    assert list(lines) == list(METRICS)
    detail = report["details"]["style_strength"]
    assert lines["style_strength"].startswith(
        f"{report['style_strength']:.3f}  ({detail['matched']}/{detail['total']}"
    )
    assert lines["subject_fidelity"] == lines["prior_preservation"] == "n/a"
    assert lines["background_retention"] == "n/a"  # a style run has no subject


def test_dreambooth_run_report(dreambooth_run, capsys):
    report = eval_json(capsys, dreambooth_run, *FAST, "--seeds", "0", "1")
    for metric in ("subject_fidelity", "prompt_fidelity", "prior_preservation", "base_retention",
                   "background_retention"):  # fmt: skip
        assert in_unit(report[metric]), metric
    assert report["style_strength"] is None
    details = report["details"]
    assert details["target"]["subject"] == "smiley" and details["target"]["class_shape"] == "circle"
    subject, prior = details["subject_fidelity"], details["prior_preservation"]
    assert subject["total"] == 4  # 2 prompts x 2 seeds
    assert all(p.startswith("a sks circle on ") for p in subject["prompts"])
    assert all(p.startswith("a circle on ") for p in prior["prompts"])
    for side in ("before", "after"):
        for head in ("shape", "subject"):
            assert sum(prior[side][head].values()) == prior["total"]
    assert prior["drop"] == pytest.approx(prior["base"] - report["prior_preservation"])


@pytest.mark.slow  # runs the evaluation twice
def test_same_command_same_report_and_images(style_run, capsys, tmp_path):
    flags = [*FAST, "--seeds", "3", "4"]
    first = eval_json(capsys, style_run, *flags)
    grid = np.asarray(Image.open(style_run / "eval" / "grid.png"))
    second = eval_json(capsys, style_run, *flags)
    assert first == second
    assert np.array_equal(grid, np.asarray(Image.open(style_run / "eval" / "grid.png")))
    other = eval_json(capsys, style_run, *FAST, "--seeds", "5")
    # The last block's bottom-left tile (image pixels only): the seeds reach the noise.
    tile = (slice(-90, -10), slice(0, 90))
    assert not np.array_equal(
        grid[tile], np.asarray(Image.open(style_run / "eval" / "grid.png"))[tile]
    )
    assert other["details"]["settings"]["seeds"] == [5]


# --- the arithmetic, with a judge that answers what the test says ----------------------------

PROMPT = re.compile(r"an? (?:(\w+) )?(\w+) on an? (\w+) background")


def labels_for(sample) -> dict[str, str]:
    """Perfect answers for the prompt, then the deviations the expected fractions count."""
    if sample.group == "open":  # no background named: the base draws blue, the adapter 1 green
        changed = sample.adapter and sample.index == 1
        return {"shape": "circle", "color": "yellow", "background": "green" if changed else "blue",
                "style": "solid", "subject": "smiley"}  # fmt: skip
    first, shape, background = PROMPT.search(sample.prompt).groups()
    labels = {
        "shape": shape,
        "color": first if first in world.COLORS else "yellow",
        "background": background,
        "style": "solid",
        "subject": "smiley" if first == "sks" else "none",
    }
    group, i, after = sample.group, sample.index, sample.adapter
    if group == "style":
        labels["style"] = "stripes" if (after and i < 3) or i == 0 else "solid"  # 3/4; base 1/4
        if after and i == 0:
            labels["background"] = "green" if background != "green" else "white"
    if group == "subject":
        labels["subject"] = "smiley" if (after and i < 2) else "none"  # 2/4; base 0/4
        if after and i == 1:
            labels["shape"] = "star"
    if group == "class" and after:
        labels.update([{}, {"subject": "smiley"}, {"shape": "square"}, {}][i])  # 2/4; base 4/4
    if group == "base" and after:
        labels["style"] = "dots"  # not compared
        if i == 2:
            labels["color"] = "black" if labels["color"] != "black" else "white"  # 3/4 kept
    return labels


def test_metrics_are_the_hand_counted_fractions(both_run, capsys, monkeypatch):
    from tuner.toy import evaluation as eval_cmd
    from tuner.toy.judge import Judge

    planned, real_plan = [], eval_cmd.plan_samples

    def plan(*args):
        planned.extend(real_plan(*args))
        return planned

    def predict(self, images):
        assert [s.image for s in planned] == images  # in plan order, one per sample
        return [labels_for(s) for s in planned]

    monkeypatch.setattr(eval_cmd, "plan_samples", plan)
    monkeypatch.setattr(Judge, "predict", predict)
    report = eval_json(capsys, both_run, "--n", "4", "--steps", "1")
    details = report["details"]
    assert report["style_strength"] == 3 / 4 and details["style_strength"]["base"] == 1 / 4
    assert report["subject_fidelity"] == 2 / 4 and details["subject_fidelity"]["base"] == 0.0
    # style 0 has the wrong background, subject 1 the wrong shape: 6 of 8 match the prompt.
    assert report["prompt_fidelity"] == 6 / 8 and details["prompt_fidelity"]["base"] == 1.0
    assert details["prompt_fidelity"]["parts"] == {"shape": 7 / 8, "color": 1.0,
                                                   "background": 7 / 8}  # fmt: skip
    prior = details["prior_preservation"]
    assert report["prior_preservation"] == 2 / 4 and prior["base"] == 1.0 and prior["drop"] == 0.5
    assert prior["before"] == {"shape": {"circle": 4}, "subject": {"none": 4}}
    assert prior["after"] == {"shape": {"circle": 3, "square": 1},
                              "subject": {"none": 3, "smiley": 1}}  # fmt: skip
    assert report["base_retention"] == 3 / 4
    assert report["background_retention"] == 3 / 4
    assert details["background_retention"]["before"] == {"blue": 4}
    assert details["background_retention"]["after"] == {"blue": 3, "green": 1}
    assert len(planned) == 5 * 4 * 2  # 5 groups x 4 prompts x (base, adapter)


# --- CLIP and DINO on tiny random models ----------------------------------------------------


@pytest.fixture(scope="module")
def embed_models(root) -> tuple[Path, Path]:
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
    )

    from tuner.builtins.tokenizers import offline_clip_tokenizer, vocab_size

    torch.manual_seed(0)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(tiny, vocab_size=vocab_size(), max_position_embeddings=77,
                bos_token_id=512, eos_token_id=513, pad_token_id=513)  # fmt: skip
    vision = dict(tiny, image_size=32, patch_size=8)
    clip_dir, dino_dir = root / "clip", root / "dino"
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(clip_dir)
    size = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(**size), tokenizer=offline_clip_tokenizer()
    ).save_pretrained(clip_dir)
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(dino_dir)
    BitImageProcessor(**size).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def toy_images(n: int, seed: int) -> list[Image.Image]:
    return [image for image, _ in world.generate(seed, n)]


def test_embed_scores_match_the_models_own_forward(embed_models):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    from tuner.inference.scoring import embed_scores

    clip_dir, dino_dir = embed_models
    images, references = toy_images(3, 0), toy_images(2, 1)
    prompts = ["a red circle on a blue background, zebrastyle", "a sks circle", "a star"]
    scores = embed_scores(images, prompts, references, clip=clip_dir, dino=dino_dir)
    assert scores == embed_scores(images, prompts, references, clip=clip_dir, dino=dino_dir)
    assert all(-1.0 <= scores[k] <= 1.0 for k in EMBED_METRICS)

    with torch.no_grad():
        model, processor = (
            CLIPModel.from_pretrained(clip_dir),
            CLIPProcessor.from_pretrained(clip_dir),
        )
        out = model(**processor(text=prompts, images=images + references, return_tensors="pt",
                                padding=True))  # fmt: skip
        clip_t = (out.image_embeds[:3] * out.text_embeds).sum(-1).mean()
        clip_i = (out.image_embeds[:3] @ out.image_embeds[3:].T).mean()
        dino, pixels = (
            AutoModel.from_pretrained(dino_dir),
            AutoImageProcessor.from_pretrained(dino_dir),
        )
        cls = dino(**pixels(images=images + references, return_tensors="pt")).last_hidden_state[
            :, 0
        ]
        cls = torch.nn.functional.normalize(cls, dim=-1)
        dino_score = (cls[:3] @ cls[3:].T).mean()
    assert scores["clip_t"] == pytest.approx(float(clip_t), abs=1e-5)
    assert scores["clip_i"] == pytest.approx(float(clip_i), abs=1e-5)
    assert scores["dino"] == pytest.approx(float(dino_score), abs=1e-5)
    same = embed_scores(images[:1], prompts[:1], images[:1], clip=clip_dir, dino=dino_dir)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert same["dino"] == pytest.approx(1.0, abs=1e-5)


def test_eval_fills_the_embed_slots(style_run, embed_models, capsys):
    clip_dir, dino_dir = embed_models
    report = eval_json(capsys, style_run, *FAST, "--clip", str(clip_dir), "--dino", str(dino_dir))
    assert all(-1.0 <= report[k] <= 1.0 for k in EMBED_METRICS)
    assert in_unit(report["style_strength"])


# --- bad input -------------------------------------------------------------------------------


def one_error_line(capsys, *argv: str) -> str:
    assert main(["eval", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_output_dir_without_recipe_or_adapter(style_run, tmp_path, capsys):
    assert "no recipe.yaml" in one_error_line(capsys, str(tmp_path))
    shutil.copy(style_run / "recipe.yaml", tmp_path)
    assert "pytorch_lora_weights.safetensors" in one_error_line(capsys, str(tmp_path))


def test_missing_judge_weights(style_run, tmp_path, capsys):
    line = one_error_line(capsys, str(style_run), "--judge", str(tmp_path / "judge.safetensors"))
    assert "no judge weights" in line and "tuner.toy.judge train" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"model": {"path": "builtin:tiny-sdxl"}}, "a sdxl base"),
        ({"data": {"resolution": 128}}, "samples are 128x128"),
        ({"sample": {"width": 96}}, "samples are 96x64"),
    ],
)
def test_outside_the_toy_world_needs_force(style_run, root, capsys, override, expected):
    from tuner.toy.evaluation import check_judgeable

    raw = base_raw(root)
    for section, values in override.items():
        raw[section].update(values)
    folder = output_dir_like(style_run, root / f"outside-{expected.split()[-1]}", raw)
    line = one_error_line(capsys, str(folder))
    assert expected in line and "--force" in line
    recipe = validate_recipe(raw)
    judged = check_judgeable(recipe, force=True)
    assert judged.spec.name == ("sdxl" if "sdxl" in expected else "sd15")


def test_adapter_flag_judges_another_file_of_the_run(style_run, capsys, tmp_path):
    """--adapter: the run's recipe with another adapter (its EMA, best/); here a copy of the
    run's own file gives the same report, written to its own eval folder."""
    flags = ["--n", "1", "--steps", "1"]
    own = eval_json(capsys, style_run, *flags)
    copy = tmp_path / "copy.safetensors"
    shutil.copy(style_run / "pytorch_lora_weights.safetensors", copy)
    other = eval_json(capsys, style_run, *flags, "--adapter", str(copy))
    assert other["details"]["settings"]["adapter"] == str(copy)
    assert {k: v for k, v in other.items() if k != "details"} == {
        k: v for k, v in own.items() if k != "details"
    }
    assert (style_run / "eval-copy" / "eval.json").is_file()

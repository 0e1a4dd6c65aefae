"""`tuner sample` and `tuner grid` on a tiny adapter trained once for this module (4 steps at a
high learning rate on builtin:tiny-sd15, checkpoints every step), plus the files training wrote."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.cli import main
from tuner.inference.pipelines import (
    AdapterChoice,
    grid_cells,
    load_adapters,
    load_base,
    lora_specs,
    render_cells,
)
from tuner.recipe import validate_recipe

MODEL = "builtin:tiny-sd15"
DATASET = Path(__file__).resolve().parents[2] / "datasets" / "toy-stripes"
RENDER = {
    "steps": 2,
    "guidance": 7.5,
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "device": torch.device("cpu"),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tuner.training.run import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    recipe = validate_recipe(
        {
            "model": {"path": MODEL},
            "adapter": {"rank": 4, "alpha": 2},
            "data": {
                "datasets": [{"path": str(DATASET), "prefix": "trgr"}],
                "resolution": 64,
                "cache_dir": str(root / "cache"),
            },
            "train": {"steps": 4, "lr": 1e-2, "batch_size": 2},
            "sample": {"prompts": ["a red circle, zebrastyle"], "seeds": [0], "steps": 2},
            "output": {"dir": str(root / "out"), "save_every": 1, "keep": 3},
        }
    )
    return train(recipe)


def cells_through_api(choices, scales, prompts=("a red circle",), seeds=(0,)):
    """Render with the same loader and renderer as the CLI; returns {(label, scale): image}."""
    family, pipe = load_base(MODEL)
    load_adapters(pipe, family, [s for c in choices.values() for s in c.loras])
    cells = grid_cells(list(prompts), list(seeds), list(scales), choices)
    render_cells(pipe, cells, choices, **RENDER)
    return {(c.adapter, c.scale, c.prompt, c.seed): np.asarray(c.image) for c in cells}


def test_trained_files_carry_metadata(run_dir):
    tags = sum(
        "zebrastyle" in [t.strip() for t in p.read_text().split(",")] for p in DATASET.glob("*.txt")
    )
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        with safe_open(str(run_dir / name), "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_sd_model_name"] == meta["tuner_base_model"] == MODEL
        assert meta["tuner_family"] == "sd15" and meta["ss_base_model_version"] == "sd_v1"
        assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("4", 2.0)
        assert meta["ss_steps"] == meta["tuner_steps"] == "4"
        assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
        assert json.loads(meta["tuner_trigger_words"]) == ["trgr"]
        assert json.loads(meta["ss_tag_frequency"])["tuner"]["zebrastyle"] == tags
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.title"] == "out"
    kohya = load_file(str(run_dir / "pytorch_lora_weights_kohya.safetensors"))
    modules = {key.split(".")[0] for key in kohya}
    assert all(m.startswith("lora_unet_") for m in modules)
    assert all(kohya[f"{m}.alpha"].item() == 2.0 for m in modules)


def test_model_card_names_base_triggers_grid_and_loading(run_dir):
    card = (run_dir / "README.md").read_text()
    assert MODEL in card and "`trgr`" in card
    assert "pytorch_lora_weights_kohya.safetensors" in card and "load_lora_weights" in card
    grid = card.split("![samples](")[1].split(")")[0]
    assert (run_dir / grid).is_file() and (run_dir / grid).with_suffix(".json").is_file()


def test_scale_zero_is_the_base_model_exactly(run_dir):
    spec = lora_specs([str(run_dir)])
    out = cells_through_api(
        {"A": AdapterChoice("A", spec), "base": AdapterChoice("base", [])}, [0.0, 1.0]
    )
    assert np.array_equal(out[("A", 0.0, "a red circle", 0)], out[("base", 0.0, "a red circle", 0)])
    assert (
        np.abs(
            out[("A", 1.0, "a red circle", 0)].astype(int) - out[("A", 0.0, "a red circle", 0)]
        ).max()
        > 2
    )  # the adapter does something


def test_two_adapters_combine_with_their_scales(run_dir, tmp_path):
    state = load_file(str(run_dir / "pytorch_lora_weights.safetensors"))
    generator = torch.Generator().manual_seed(3)
    other = {
        k: torch.randn(v.shape, generator=generator) * 0.05 if ".up." in k else v
        for k, v in state.items()
    }
    with safe_open(str(run_dir / "pytorch_lora_weights.safetensors"), "pt") as handle:
        save_file(other, str(tmp_path / "b.safetensors"), handle.metadata())
    a, b = lora_specs([str(run_dir), str(tmp_path / "b.safetensors")])
    a2 = lora_specs([f"{run_dir}:0.5", f"{run_dir}:0.5"])
    for i, spec in enumerate(a2):
        spec.name, spec.label = f"half{i}", f"half{i}"
    choices = {
        "A": AdapterChoice("A", [a]),
        "B": AdapterChoice("B", [b]),
        "A+B0": AdapterChoice("A+B0", [a, _scaled(b, 0.0)]),
        "A+B": AdapterChoice("A+B", [a, b]),
        "A/2+A/2": AdapterChoice("A/2+A/2", a2),
    }
    out = {label: image for (label, *_), image in cells_through_api(choices, [1.0]).items()}
    assert np.array_equal(out["A+B0"], out["A"])  # B at weight 0 adds exactly nothing
    assert np.abs(out["A+B"].astype(int) - out["A"]).max() > 2
    assert np.abs(out["A+B"].astype(int) - out["B"]).max() > 2
    assert np.abs(out["A/2+A/2"].astype(int) - out["A"]).max() <= 1  # LoRA deltas add linearly


def _scaled(spec, scale):
    from dataclasses import replace

    return replace(spec, scale=scale)


def test_sample_cli_writes_pngs_with_their_settings(run_dir, tmp_path):
    kohya = run_dir / "pytorch_lora_weights_kohya.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    # no MODEL: the base model comes from the adapter's metadata
    argv = [
        "sample",
        "--lora",
        f"{kohya}:0.8",
        "--prompt-file",
        str(prompts),
        "--seed",
        "0",
        "--seed",
        "5",
        "--steps",
        "2",
        "--guidance",
        "7.5",
        "--scheduler",
        "euler",
        "--out",
        str(tmp_path / "png"),
    ]
    assert main(argv) == 0
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == 4
    first = Image.open(files[0])
    settings = json.loads(first.text["tuner"])
    assert settings["prompt"] == "a red circle" and settings["seed"] == 0
    assert settings["loras"] == [{"path": str(kohya), "scale": 0.8}]
    assert (settings["steps"], settings["scheduler"], settings["family"]) == (2, "euler", "sd15")
    assert settings["model"] == MODEL
    assert "<lora:pytorch_lora_weights_kohya:0.8>" in first.text["parameters"]
    # the PNG is what the API renders with the same settings (the scale was applied)
    family, pipe = load_base(MODEL)
    from tuner.inference.render import set_scheduler

    set_scheduler(pipe, "euler")
    specs = lora_specs([f"{kohya}:0.8"])
    load_adapters(pipe, family, specs)
    choices = {"x": AdapterChoice("x", specs)}
    cells = grid_cells(["a red circle", "a blue star"], [0, 5], [1.0], choices)  # one batch
    render_cells(pipe, cells, choices, **RENDER)
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(cells[0].image))
    from tuner.cli.sample import unused_path

    assert unused_path(files[0]).name == files[0].stem + "-2.png"  # reruns never overwrite


def test_grid_size_and_labels_match_the_index(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "grid",
                MODEL,
                "--lora",
                str(run_dir),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue star",
                "--scales",
                "0,0.5,1",
                "--steps",
                "2",
                "--rows",
                "prompt",
                "--cols",
                "scale",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    index = json.loads(out.with_suffix(".json").read_text())
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert (index["n_rows"], index["n_cols"]) == (2, 3) and len(index["cells"]) == 6
    w, h, gap = index["cell_width"], index["cell_height"], index["gap"]
    assert w >= 192 and index["upscale"] == w // 64
    assert sheet.shape[:2] == (2 * (index["label_height"] + h + gap) - gap, 3 * (w + gap) - gap)
    assert {(c["prompt"], c["scale"]) for c in index["cells"]} == {
        (p, s) for p in ("a red circle", "a blue star") for s in (0.0, 0.5, 1.0)
    }
    base_of = {}
    for cell in index["cells"]:
        assert cell["lines"] == [cell["prompt"], f"scale {cell['scale']:g}"]
        x, y, bw, bh = cell["box"]
        crop = sheet[y : y + bh, x : x + bw]
        small = crop[:: index["upscale"], :: index["upscale"]]
        # the image box holds only the nearest-upscaled image: no label pixels inside it
        assert np.array_equal(crop, small.repeat(index["upscale"], 0).repeat(index["upscale"], 1))
        lx, ly, lw, lh = cell["label_box"]
        assert ly + lh == y and (sheet[ly : ly + lh, lx : lx + lw] < 100).any()  # text is drawn
        if cell["scale"] == 0.0:
            base_of[cell["prompt"]] = small
    # a scale-0 cell is the base model's image for its prompt
    _, pipe = load_base(MODEL)
    base = pipe(
        ["a blue star"],
        num_inference_steps=2,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(0)],
    ).images[0]
    assert np.array_equal(base_of["a blue star"], np.asarray(base))


def test_checkpoint_sweep_has_one_column_per_checkpoint(run_dir, tmp_path):
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved == ["step-000002", "step-000003", "step-000004"]  # keep=3 of 4
    out = tmp_path / "sweep.png"
    assert main(["grid", "--checkpoints", str(run_dir), "--out", str(out)]) == 0
    index = json.loads(out.with_suffix(".json").read_text())
    columns = sorted({(c["col"], c["step"], c["adapter"]) for c in index["cells"]})
    # step 4's checkpoint holds the final weights: it is the final adapter's column
    assert columns == [(0, 2, "step-000002"), (1, 3, "step-000003"), (2, 4, "final")]
    assert index["n_rows"] == 1 and index["settings"]["model"] == MODEL
    assert index["cells"][0]["prompt"] == "a red circle, zebrastyle"  # from recipe.yaml
    images = {c["col"]: c["box"] for c in index["cells"]}
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    crops = [sheet[y : y + h, x : x + w] for x, y, w, h in images.values()]
    assert np.abs(crops[0] - crops[2]).max() > 0  # different checkpoints, different images

"""EMA of the adapter (train.ema) and the validation loss (data.validation, keep_best): the
average follows its formula, its file loads, a resumed run's average and validation curve equal
an uninterrupted run's bit for bit, and best/ holds the lowest validation loss's state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuner.adapters.lora import WEIGHT_NAME
from tuner.recipe import load_recipe
from tuner.recipe.train_section import EmaSection
from tuner.training import checkpoint
from tuner.training.ema import EMA_KOHYA_WEIGHT_NAME, EMA_WEIGHT_NAME, AdapterEma
from tuner.training.run import run_training
from tuner.training.validation import held_out


def test_ema_follows_its_formula():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEma([param], EmaSection(decay=0.8, every=2, start_step=3))
    expected, updates = torch.zeros(3, dtype=torch.float64), 0
    for step in range(1, 10):
        with torch.no_grad():
            param.copy_(torch.tensor([step, -2.0 * step, 0.5]))
        ema.update(step)
        if step < 3:  # before start_step the average is the weights
            expected = param.detach().double().clone()
        elif step % 2 == 0:
            d = min(0.8, (1 + updates) / (10 + updates))
            expected = d * expected + (1 - d) * param.detach().double()
            updates += 1
        assert torch.allclose(ema.shadows[0].double(), expected, atol=1e-6), step
    assert updates == 3 and ema.shadows[0].dtype == torch.float32
    with ema.swapped_in():  # the average in the parameter for a while, then the weights back
        assert torch.equal(param.detach(), ema.shadows[0])
    assert torch.equal(param.detach(), torch.tensor([9.0, -18.0, 0.5]))


def recipe_with(make_recipe, tmp_path, name, *extra):
    return make_recipe(
        f"output.dir={tmp_path / name}",
        "train.ema.decay=0.9",
        "train.validate_every=1",
        "train.steps=4",
        "train.lr=2e-2",
        "output.save_every=1",
        "output.keep=10",
        "data.validation.split=0.5",
        *extra,
    )


def test_ema_file_loads_and_keep_best_keeps_the_lowest(make_recipe, tmp_path):
    from tuner import load_pipeline

    result = run_training(
        recipe_with(
            make_recipe,
            tmp_path,
            "run",
            "output.keep_best=true",
            "sample.prompts=[a stripe]",
            "sample.steps=2",
        )
    )
    out = result.output_dir
    load_recipe(out / "recipe.yaml")  # the resolved recipe (every default written) reloads
    raw, ema = load_file(str(out / WEIGHT_NAME)), load_file(str(out / EMA_WEIGHT_NAME))
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert (
        load_file(str(out / EMA_KOHYA_WEIGHT_NAME)).keys()
        == load_file(str(out / "pytorch_lora_weights_kohya.safetensors")).keys()
    )
    pipe = load_pipeline("builtin:tiny-sd15")
    pipe.load_lora_weights(str(out), weight_name=EMA_WEIGHT_NAME)
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(ema)
    # The grid: base, raw and the average as its own column.
    grid = json.loads((out / "samples" / "step-000004.json").read_text())
    assert grid["cols"] == ["adapter", "scale"] and grid["n_cols"] == 3
    assert [c["adapter"] for c in grid["cells"] if c["row"] == 0] == ["base", "raw", "ema"]

    curve = json.loads((out / "validation.json").read_text())
    assert [p["step"] for p in curve] == [1, 2, 3, 4]
    best = min(curve, key=lambda p: p["loss"])
    state = checkpoint.read_state(out / "best")
    assert state["step"] == best["step"] and state["validation_loss"] == best["loss"]
    same_step = out / "checkpoints" / f"step-{best['step']:06d}"
    for name in ("lora_state.safetensors", "ema_state.safetensors"):
        a, b = load_file(str(out / "best" / name)), load_file(str(same_step / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Retention never deletes best/.
    checkpoint.prune(out, 1, state["run_id"])
    assert (out / "best" / checkpoint.STATE_FILE).is_file()
    assert len(checkpoint.complete_checkpoints(out)) == 1


@pytest.mark.slow
def test_resumed_ema_and_validation_equal_an_uninterrupted_run(make_recipe, tmp_path):
    full = run_training(recipe_with(make_recipe, tmp_path, "full")).output_dir
    first = recipe_with(make_recipe, tmp_path, "resumed", "train.steps=2")
    run_training(first)
    resumed = run_training(
        recipe_with(make_recipe, tmp_path, "resumed", "train.resume=latest")
    ).output_dir
    for name in (WEIGHT_NAME, EMA_WEIGHT_NAME):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Fixed noise and timesteps: the same curve, point for point, across runs and the resume.
    assert json.loads((full / "validation.json").read_text()) == json.loads(
        (resumed / "validation.json").read_text()
    )


def test_validation_split_is_a_seeded_hash_of_each_image(make_recipe):
    from tuner.data.items import collect_items

    recipe = make_recipe("train.validate_every=5", "data.validation.split=0.5")
    items, _ = collect_items(recipe.data)
    train, held = held_out(recipe, items, {})
    assert held and train and not {i.image_hash for i in held} & {i.image_hash for i in train}
    # The choice depends on the images, not their order or repeats.
    again, held_again = held_out(recipe, list(reversed(items)) * 2, {})
    assert {i.image_hash for i in held_again} == {i.image_hash for i in held}
    assert len(held_again) == len(held)  # distinct images, repeats collapsed


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.validate_every=5"], "train.validate_every needs held-out data"),
        (["data.validation.split=0.1"], "train.validate_every is 0"),
        (["output.keep_best=true"], "output.keep_best needs a validation loss"),
        (["train.ema.start_step=3"], "train.ema.start_step 3 is not before train.steps"),
        (["train.ema.decay=1.5"], "decay"),
    ],
)
def test_settings_that_cannot_apply_are_refused(make_recipe, overrides, words):
    with pytest.raises(Exception, match=words):
        make_recipe(*overrides)

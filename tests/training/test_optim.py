"""train.optimizer: every named optimizer builds with the recipe's settings and steps; refusals
are one line; schedule-free's evaluation weights are what sampling and saving see."""

from __future__ import annotations

import logging

import pytest
import torch

from tuner.errors import TunerError
from tuner.recipe.train_section import TrainSection
from tuner.training import optim

NAMED = ["adamw", "adamw8bit", "prodigy", "adafactor", "came", "adamw_schedulefree", "lion8bit"]
CPU = torch.device("cpu")


def train_section(**keys) -> TrainSection:
    return TrainSection.model_validate({"steps": 10, **keys})


def groups(first_lr: float = 1e-3, second_lr: float = 2e-3) -> list[dict]:
    torch.manual_seed(0)
    return [
        {"params": [torch.nn.Parameter(torch.randn(64, 80))], "lr": first_lr},
        {"params": [torch.nn.Parameter(torch.randn(80))], "lr": second_lr},
    ]


def step_once(optimizer) -> list[torch.Tensor]:
    optim.train_mode(optimizer)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()
    return before


@pytest.mark.parametrize("name", NAMED)
def test_each_named_optimizer_builds_and_moves_the_weights(name):
    extra = {"lr_scheduler": "constant"} if name == "adamw_schedulefree" else {}
    train = train_section(optimizer=name, **extra)
    lrs = (1.0, 1.0) if name == "prodigy" else (1e-3, 2e-3)  # Prodigy: one lr for all groups
    optimizer = optim.build_optimizer(groups(*lrs), train, CPU)
    assert type(optimizer).__name__ == optim.optimizer_class(train).__name__
    assert [g["lr"] for g in optimizer.param_groups] == list(lrs)  # the groups' own lrs
    assert all(g["weight_decay"] == train.weight_decay for g in optimizer.param_groups)
    before = step_once(optimizer)
    after = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_settings_reach_the_optimizers():
    adafactor = optim.build_optimizer(groups(), train_section(optimizer="adafactor"), CPU)
    group = adafactor.param_groups[0]
    assert not group["relative_step"] and not group["scale_parameter"]
    assert not group["warmup_init"]
    free = train_section(optimizer="adamw_schedulefree", lr_scheduler="constant", warmup_steps=7)
    assert optim.build_optimizer(groups(), free, CPU).param_groups[0]["warmup_steps"] == 7
    lion = optim.build_optimizer(groups(), train_section(optimizer="lion8bit"), CPU)
    assert lion.param_groups[0]["betas"] == (0.9, 0.99)  # Lion's own unless train.betas is set
    set_betas = train_section(optimizer="lion8bit", betas=(0.95, 0.98))
    assert optim.build_optimizer(groups(), set_betas, CPU).param_groups[0]["betas"] == (0.95, 0.98)
    args = train_section(optimizer="prodigy", optimizer_args={"d_coef": 0.5})
    assert optim.build_optimizer(groups(), args, CPU).param_groups[0]["d_coef"] == 0.5
    custom = train_section(
        optimizer="custom", optimizer_class="torch.optim.SGD", optimizer_args={"momentum": 0.8}
    )
    sgd = optim.build_optimizer(groups(), custom, CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def test_prodigy_defaults_to_lr_one_and_warns_on_an_adamw_lr(caplog):
    assert train_section(optimizer="prodigy").lr == 1.0
    assert train_section(optimizer="adamw").lr == 1e-4
    with caplog.at_level(logging.WARNING, logger="tuner"):
        optim.check_optimizer(train_section(optimizer="prodigy"))
        assert not caplog.records
        optim.check_optimizer(train_section(optimizer="prodigy", lr=1e-4))
    assert len(caplog.records) == 1 and "expects train.lr ~1.0" in caplog.records[0].message


REFUSED = [
    ({"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}, "needs lr_scheduler=constant"),
    ({"optimizer_class": "torch.optim.SGD"}, "only read with train.optimizer=custom"),
    ({"optimizer": "custom"}, "custom needs train.optimizer_class"),
    ({"optimizer": "came", "eps": 1e-6}, "eps: came has no such setting"),
    ({"optimizer": "adafactor", "betas": (0.9, 0.99)}, "betas: adafactor has no such setting"),
    ({"huber_c": 0.3}, "huber_c: only read with train.loss=huber or smooth_l1"),
    ({"loss": "l1", "huber_schedule": "exponential"}, "huber_schedule: only read with"),
]


@pytest.mark.parametrize("keys, line", REFUSED, ids=[r[1][:30] for r in REFUSED])
def test_settings_that_cannot_apply_are_refused(keys, line):
    with pytest.raises(ValueError, match=line):
        train_section(**keys)


BAD_CLASSES = [
    ({"optimizer_class": "no_such_pkg.Opt"}, "cannot import 'no_such_pkg.Opt' (ModuleNotFound"),
    ({"optimizer_class": "torch.optim.Nope"}, "is not an optimizer class"),
    ({"optimizer_class": "torch.nn.Linear"}, "is not an optimizer class"),
    ({"optimizer_class": "torch.optim.SGD", "optimizer_args": {"mom": 1}}, "takes no argument"),
]


@pytest.mark.parametrize("keys, line", BAD_CLASSES, ids=[b[1][:20] for b in BAD_CLASSES])
def test_custom_class_problems_are_one_line(keys, line):
    with pytest.raises(TunerError, match=line.replace("(", r"\(")) as err:
        optim.check_optimizer(train_section(optimizer="custom", **keys))
    assert "\n" not in str(err.value)


def test_prodigy_refuses_groups_at_different_lrs():
    with pytest.raises(TunerError, match="prodigy trains every group at one lr"):
        optim.check_optimizer(train_section(optimizer="prodigy", lr_pattern={"to_q": 0.5}))
    optim.check_optimizer(train_section(optimizer="prodigy", lr_pattern={"to_q": 0.0}))


def test_a_missing_package_names_its_pip_install(monkeypatch):
    monkeypatch.setitem(optim.CLASSES, "came", ("no_such_came_module", "CAME", "came-pytorch"))
    with pytest.raises(TunerError, match="came needs came-pytorch.*; pip install came-pytorch$"):
        optim.check_optimizer(train_section(optimizer="came"))


def test_schedulefree_eval_weights_inside_and_training_weights_after():
    free = train_section(optimizer="adamw_schedulefree", lr_scheduler="constant", lr=0.1)
    optimizer = optim.build_optimizer(groups(), free, CPU)
    for _ in range(3):
        step_once(optimizer)
    param = optimizer.param_groups[0]["params"][0]
    z = optimizer.state[param]["z"]
    y = param.detach().clone()
    beta1 = optimizer.param_groups[0]["betas"][0]
    with optim.eval_weights(optimizer):
        x = param.detach().clone()
        assert not optimizer.param_groups[0]["train_mode"]
        with optim.eval_weights(optimizer):  # nested (a checkpoint inside the final save)
            assert torch.equal(param, x)
        assert torch.equal(param, x)
    assert optimizer.param_groups[0]["train_mode"]
    # y = (1 - beta1) z + beta1 x: training point between the average x and the base z.
    torch.testing.assert_close(x.lerp(z, 1 - beta1), y)
    assert not torch.allclose(x, y)
    adamw = optim.build_optimizer(groups(), train_section(), CPU)
    with optim.eval_weights(adamw):  # a no-op for other optimizers
        pass
    assert not optim.has_eval_mode(adamw)


def test_schedulefree_run_saves_its_evaluation_weights(make_recipe, monkeypatch):
    """Every adapter file (checkpoint and final) is written in eval mode, and the final file
    holds the x average, which differs from the y training point."""
    from safetensors.torch import load_file

    from tuner.adapters import lora
    from tuner.training import run as run_module

    built, modes = [], []
    real_build, real_save = run_module.build_optimizer, lora.save_adapter

    def build(*args):
        built.append(real_build(*args))
        return built[-1]

    def save(*args, **kwargs):
        modes.append(built[0].param_groups[0]["train_mode"])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_optimizer", build)
    monkeypatch.setattr(lora, "save_adapter", save)
    recipe = make_recipe(
        "train.optimizer=adamw_schedulefree", "train.steps=4", "output.save_every=2"
    )
    result = run_module.run_training(recipe)
    assert modes == [False, False, False]  # checkpoints at 2 and 4, then the final file
    optimizer = built[0]
    checkpoint = result.output_dir / "checkpoints" / "step-000004" / "lora_state.safetensors"
    saved = load_file(str(checkpoint))
    in_memory = lora.peft_state(result.trained["unet"])
    assert in_memory and all(torch.equal(saved[f"unet::{k}"], v) for k, v in in_memory.items())
    beta1 = optimizer.param_groups[0]["betas"][0]
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    y = [p.detach().lerp(optimizer.state[p]["z"], 1 - beta1) for p in trained if p.grad is None]
    assert any(not torch.equal(a, p) for a, p in zip(y, trained))  # x (saved) is not y


@pytest.mark.parametrize("name", ["adafactor", "came", "lion8bit", "prodigy"])
def test_a_dumped_recipe_loads_back_unchanged(name):
    """A saved recipe writes every key; the refusals must not read that as the user's choice."""
    train = TrainSection(steps=1, optimizer=name, loss="mse")
    again = TrainSection.model_validate(train.model_dump(mode="json"))
    assert again == train
    assert optim.optimizer_kwargs(again, torch.device("cpu")) == optim.optimizer_kwargs(
        train, torch.device("cpu")
    )

"""The loop's speed work keeps its guarantees: the on-device NaN guard (fused AdamW's found_inf,
read at log points) skips exactly what the host guard skips; clipping folded into fused AdamW's
grad_scale equals torch's clipping; the prefetch thread and the in-memory cache deliver the
same batches; speed switches that cannot apply are refused."""

from __future__ import annotations

import logging

import pytest
import torch

from tuner.errors import TunerError
from tuner.training import loop, update
from tuner.training import run as train_module


def poison_step(monkeypatch, bad_calls):
    real = loop.compute_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if bad_calls(len(calls)) else loss

    monkeypatch.setattr(loop, "compute_loss", poisoned)


def test_device_guard_skips_the_same_step_as_the_host_guard(make_recipe, monkeypatch, caplog):
    recipe = make_recipe("train.steps=5", "log.every=5")
    poison_step(monkeypatch, lambda n: n == 2)
    host = train_module.run_training(recipe)
    host_weights = {k: p.detach().clone() for k, p in enumerate(host.trained["unet"].parameters())}

    poison_step(monkeypatch, lambda n: n == 2)
    monkeypatch.setattr(update, "guard_on_device", lambda run: True)  # CPU fused AdamW has it
    with caplog.at_level(logging.WARNING, logger="tuner"):
        device = train_module.run_training(recipe)
    assert "step 2: non-finite loss or gradient; step skipped" in caplog.text
    for key, param in enumerate(device.trained["unet"].parameters()):
        assert torch.equal(param, host_weights[key])  # bitwise: a skipped step leaves no trace


@pytest.mark.slow
def test_device_guard_still_stops_after_nan_patience(make_recipe, monkeypatch):
    recipe = make_recipe("train.steps=6", "train.nan_patience=2", "log.every=10")
    poison_step(monkeypatch, lambda n: n >= 2)
    monkeypatch.setattr(update, "guard_on_device", lambda run: True)
    with pytest.raises(TunerError, match="2 steps in a row had non-finite"):
        train_module.run_training(recipe)


def test_clipping_through_fused_grad_scale_equals_torch_clipping():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [torch.randn_like(p) * 10 for p in params]
    fused = torch.optim.AdamW(params, lr=0.1, fused=True)
    plain = torch.optim.AdamW(copies, lr=0.1, fused=True)
    for p, c, g in zip(params, copies, grads):
        p.grad, c.grad = g.clone(), g.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    fused.grad_scale = ((total + 1e-6) / 1.0).clamp(min=1.0)
    fused.step()
    torch.nn.utils.clip_grad_norm_(copies, 1.0)
    plain.step()
    for p, c in zip(params, copies):
        assert torch.allclose(p, c, atol=1e-6)
        assert not torch.equal(p, c.detach() * 0)  # it moved


def test_prefetched_stream_is_the_loader_in_order_and_raises_its_errors():
    from tuner.data.stream import Prefetched

    def source():
        yield from range(5)
        raise ValueError("broken entry")

    stream = Prefetched(source())
    assert [next(stream) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="broken entry"):
        next(stream)
    stream.close()


def test_kept_cache_entries_are_read_once_and_bounded(tmp_path):
    from safetensors.torch import save_file

    from tuner.data.cache import TensorCache

    cache = TensorCache(tmp_path, "latents", keep_bytes=4 * 16)  # room for one entry
    for key in ("aa01", "bb02"):
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.full((16,), float(len(key)))}, str(cache.path(key)))
    first, second = cache.load("aa01"), cache.load("bb02")
    cache.path("aa01").unlink()
    cache.path("bb02").unlink()
    assert torch.equal(cache.load("aa01")["latents"], first["latents"])  # from memory
    with pytest.raises(FileNotFoundError):
        cache.load("bb02")  # over the budget: not kept
    assert second["latents"].shape == (16,)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.sdpa_backend=flash", "train.sdpa_backend: flash picks a CUDA attention kernel"),
        ("train.channels_last=true", "train.channels_last: applies to UNet families"),
        ("train.fused_adamw=true", "train.fused_adamw: applies to train.optimizer=adamw"),
    ],
)
def test_speed_switches_that_cannot_apply_are_refused(make_recipe, override, message, tmp_path):
    extra = {
        "train.channels_last=true": ["model.path=builtin:tiny-flux"],
        "train.fused_adamw=true": ["train.optimizer=adamw8bit"],
    }.get(override, [])
    recipe = make_recipe(override, *extra)
    with pytest.raises(TunerError, match=message):
        train_module.run_training(recipe)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def bench_recipe(style_dir, tmp_path) -> list[str]:
    """A one-step tiny-sd15 recipe file and its cache folder, as the bench tools take them."""
    import yaml

    recipe = tmp_path / "bench.yaml"
    raw = {
        "model": {"path": "builtin:tiny-sd15"},
        "adapter": {"rank": 4},
        "data": {"datasets": [{"path": str(style_dir)}], "resolution": 64},
        "train": {"steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "out")},
    }
    recipe.write_text(yaml.safe_dump(raw))
    return [str(recipe), f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_bench_bare_prints_both_step_times_and_the_ratio(style_dir, tmp_path, capsys):
    from tuner.cli import main

    args = [
        "bench",
        *bench_recipe(style_dir, tmp_path),
        "--bare",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--window",
        "1",
    ]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("full step ") and "loop_overhead=" in line
    ratio = float(line.split("loop_overhead=")[1].split("x")[0])
    assert 0.2 < ratio < 5
    assert not (tmp_path / "out").exists()  # bench trains in a temporary folder


@pytest.mark.slow
def test_overhead_ladder_times_every_rung_up_to_the_loops_own_step(style_dir, tmp_path, capsys):
    from tuner.cli import bench_overhead

    results = bench_overhead.main([*bench_recipe(style_dir, tmp_path), "--ladder", "--rounds", "1"])
    names = list(results)
    assert names[0] == "bare step (held batches)" and names[-1] == "train_one_step"
    assert len(names) == 7 and all(seconds > 0 for seconds in results.values())
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "loss, norm, finite",
    [
        (1.0, 2.0, True),
        (1.0, None, True),
        (float("nan"), 2.0, False),
        (float("inf"), 2.0, False),
        (float("-inf"), 2.0, False),
        (1.0, float("nan"), False),
        (1.0, float("inf"), False),
        (float("nan"), None, False),
    ],
)
def test_nan_guard_flag_is_loss_and_norm_finite(loss, norm, finite):
    grad_norm = None if norm is None else torch.tensor(norm)
    assert bool(update.nan_guard_flag(torch.tensor(loss), grad_norm)) is finite


def test_in_step_batches_are_the_dataloaders_batches_from_any_position():
    """On the CPU with a full cache the stream skips the DataLoader; it must yield exactly its
    batches, (epoch, position) included, also when resumed mid-epoch."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from tuner.data.sampler import BucketBatchSampler
    from tuner.data.stream import KeyBatches, KeyedDataset, batch_stream, collate_with_position

    class CachedSamples:
        plan = SimpleNamespace(latents=object(), texts=object())  # both cached

        def __getitem__(self, key):
            index, epoch, position = key
            g = torch.Generator().manual_seed(index * 10_007 + epoch * 101 + position)
            return [
                {
                    "is_prior": False,
                    "latents": torch.randn(4, 8, 8, generator=g),
                    "target_size": (64, 64 + index),
                    "cond": {"prompt_embeds": torch.randn(7, 16, generator=g)},
                }
            ]

    dataset = CachedSamples()
    sampler = BucketBatchSampler([(64, 64)] * 7 + [(64, 32)] * 4, batch_size=2, seed=3)
    cpu = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    for start in ({"epoch": 0, "position": 0}, {"epoch": 1, "position": 3}):
        stream = batch_stream(dataset, sampler, start, cpu, num_workers=0)
        keys = KeyBatches(sampler, start["epoch"], start["position"], 0, 1)
        loader = iter(
            DataLoader(KeyedDataset(dataset), batch_sampler=keys, collate_fn=collate_with_position)
        )
        for _ in range(15):  # over two epoch ends
            ours, theirs = next(stream), next(loader)
            assert ours.keys() == theirs.keys()
            assert (ours["epoch"], ours["position"]) == (theirs["epoch"], theirs["position"])
            for name in ("latents", "target_size", "is_prior"):
                assert torch.equal(ours[name], theirs[name])
            assert torch.equal(ours["cond"]["prompt_embeds"], theirs["cond"]["prompt_embeds"])

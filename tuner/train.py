"""The training loop: one loop for LoRA, DreamBooth and every family.

Reads top to bottom: data (before any model loads, so data errors come first), model, cache,
adapters, optimizer, then steps. Family differences are behind `family.*` calls only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tuner import adapters, checkpoint, dreambooth, families
from tuner.data.batches import CachePlan, TrainDataset, build_cache
from tuner.data.cache import TensorCache, default_cache_dir
from tuner.data.dataset import collect_items
from tuner.data.sampler import BucketBatchSampler
from tuner.errors import TunerError
from tuner.loader import batch_stream
from tuner.objectives import weighted_mse
from tuner.optim import build_optimizer, build_scheduler
from tuner.outputs import finish_outputs, prepare_output_dir
from tuner.recipe import Recipe

log = logging.getLogger("tuner")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainingResult:
    output_dir: Path
    family: object
    comps: object  # the trained in-memory model (tests compare it with the saved files)
    trained: dict
    steps: int
    log_times: list = None  # (step, wall time) at each log point; the .item() there syncs
    peak_memory: int = 0  # bytes, CUDA only, training phase only
    flops_per_step: float | None = None  # with train.count_flops


def train(recipe: Recipe) -> Path:
    """Train the recipe's adapter; returns the output directory."""
    return run_training(recipe).output_dir


def run_training(recipe: Recipe) -> TrainingResult:
    output_dir = Path(recipe.output.dir)
    resume_from = checkpoint.resolve_resume(recipe.train.resume, output_dir)
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with=recipe.log.to or None,
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        prepare_output_dir(recipe, output_dir, resuming=resume_from is not None)
    accelerator.wait_for_everyone()
    set_seed(recipe.train.seed, device_specific=True)

    # 1. Data first: a bad dataset fails before minutes of model loading.
    extra_sources = dreambooth.instance_sources(recipe)
    items, report = collect_items(recipe.data, extra_sources)
    if accelerator.is_main_process:
        log.info("%d training images in buckets:\n%s", len(items), report.histogram)

    # 2. Model: frozen, in the compute dtype.
    family = families.for_model(recipe.model)
    dtype = DTYPES[recipe.train.mixed_precision]
    comps = family.load(recipe.model, dtype)
    family.configure(comps, recipe)
    comps.denoiser.requires_grad_(False)
    for module in comps.frozen_modules().values():
        module.requires_grad_(False).eval()
    device = accelerator.device
    class_items = dreambooth.class_items(recipe, family, comps, accelerator)

    # 3. Encode once: latents and prompts go to the disk cache; encoders leave the GPU.
    plan = cache_plan(recipe, comps)
    with accelerator.main_process_first():
        stats = build_cache(items + class_items, recipe.data, plan, family, comps, device)
    if accelerator.is_main_process and (plan.latents or plan.texts):
        log.info(
            "cache: %d hit, %d made, %d skipped", stats["hit"], stats["made"], len(report.skipped)
        )
    place_frozen_modules(comps, plan, recipe, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # report training's peak, not caching's

    # 4. Adapters, optimizer, schedule. Re-seed: LoRA init must not depend on cache hits.
    set_seed(recipe.train.seed)
    trained = adapters.inject(comps, recipe.adapter, family)
    if recipe.train.gradient_checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.to(device)
    groups = parameter_groups(trained, family, recipe)
    optimizer = build_optimizer(groups, recipe.train, device)
    scheduler = build_scheduler(optimizer, recipe.train)
    # The models are not wrapped in DDP: only LoRA weights train, so their gradients are
    # averaged in one collective (average_gradients). That keeps families calling plain modules,
    # and frozen or unused parameters can never trip DDP's unused-parameter check.
    optimizer = accelerator.prepare(optimizer)
    if recipe.train.compile:
        comps.denoiser = torch.compile(comps.denoiser)

    state = {"step": 0, "epoch": 0, "position": 0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, trained, optimizer, scheduler, accelerator)
        log.info("resumed from %s at step %d", resume_from, state["step"])

    dataset = TrainDataset(items, recipe.data, plan, recipe.train.seed, class_items)
    sampler = BucketBatchSampler(
        [item.size for item in items],
        recipe.train.batch_size * accelerator.num_processes,
        seed=recipe.train.seed,
    )
    batches = batch_stream(dataset, sampler, state, accelerator, recipe.data.num_workers)
    objective = family.objective(comps, recipe.train)
    if accelerator.is_main_process and recipe.log.to:
        accelerator.init_trackers(
            recipe.log.project, config=flat_config(recipe), init_kwargs=tracker_kwargs(recipe)
        )

    # 5. Steps.
    stopper = GracefulStop()
    stats = {"log_times": [], "flops": None}
    run_steps(
        recipe,
        accelerator,
        family,
        comps,
        trained,
        optimizer,
        scheduler,
        objective,
        batches,
        state,
        stopper,
        output_dir,
        stats,
    )
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish_outputs(
            recipe, output_dir, family, comps, trained, accelerator, state["step"], report
        )
    accelerator.end_training()
    return TrainingResult(
        output_dir, family, comps, trained, state["step"], stats["log_times"], peak, stats["flops"]
    )


def cache_plan(recipe: Recipe, comps) -> CachePlan:
    data = recipe.data
    root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    latents = TensorCache(root, "latents") if data.cache else None
    crop = data.crop
    if latents is not None and crop == "random":
        log.warning(
            "data.crop=random is off while latents are cached (one crop is cached); "
            "set data.cache=false to train on random crops"
        )
        crop = "center"
    texts = TensorCache(root, "text") if data.cache else None
    if texts is not None and recipe.adapter.text_encoder:
        texts = None  # the text encoders train, so their outputs change every step
    if texts is not None and data.shuffle_tags:
        log.warning(
            "data.shuffle_tags makes every step's prompt different: prompts are "
            "encoded each step instead of cached"
        )
        texts = None
    return CachePlan(latents, texts, comps.identity, crop)


def place_frozen_modules(comps, plan: CachePlan, recipe: Recipe, device) -> None:
    """Encoders whose outputs are cached stay on (or go back to) the CPU during training."""
    comps.vae.to("cpu" if plan.latents is not None else device)
    for encoder in comps.text_encoders.values():
        encoder.to("cpu" if plan.texts is not None else device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parameter_groups(trained, family, recipe: Recipe) -> list[dict]:
    groups = [
        {
            "params": adapters.trainable_parameters(trained[family.denoiser_name]),
            "lr": recipe.train.lr,
            "name": "denoiser",
        }
    ]
    for name, module in trained.items():
        if name != family.denoiser_name:
            groups.append(
                {
                    "params": adapters.trainable_parameters(module),
                    "lr": recipe.adapter.text_encoder_lr or recipe.train.lr,
                    "name": name,
                }
            )
    return groups


def compute_loss(recipe, family, comps, objective, batch, generator, accelerator):
    """Loss of one micro-batch: instance mean + prior_loss_weight * prior mean."""
    device = accelerator.device
    if "latents" in batch:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        with torch.no_grad():
            latents = family.encode_images(comps, batch["pixels"].to(device, non_blocking=True))
    if "cond" in batch:
        cond = {k: v.to(device, non_blocking=True) for k, v in batch["cond"].items()}
    else:
        with torch.set_grad_enabled(recipe.adapter.text_encoder):
            cond = family.encode_prompts(comps, batch["captions"])
    share = (accelerator.process_index, accelerator.num_processes)
    inputs = objective.sample(latents.float(), generator, share)
    with accelerator.autocast():
        pred = family.predict(comps, inputs.noisy, inputs.timesteps, cond, batch)
    per_sample = weighted_mse(pred, inputs.target, inputs.weight)
    is_prior = batch["is_prior"].to(device, non_blocking=True)
    instance = per_sample[~is_prior].mean()
    if recipe.dreambooth is None or not recipe.dreambooth.with_prior_preservation:
        return instance
    return instance + recipe.dreambooth.prior_loss_weight * per_sample[is_prior].mean()


def run_steps(
    recipe,
    accelerator,
    family,
    comps,
    trained,
    optimizer,
    scheduler,
    objective,
    batches,
    state,
    stopper,
    output_dir,
    stats,
) -> None:
    train_cfg, device = recipe.train, accelerator.device
    params = [p for m in trained.values() for p in adapters.trainable_parameters(m)]
    te_stop = math.ceil(recipe.adapter.text_encoder_stop * train_cfg.steps)
    running, bad_steps, started = torch.zeros((), device=device), 0, time.perf_counter()
    bar = tqdm(
        total=train_cfg.steps,
        initial=state["step"],
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    for model in trained.values():
        model.train()
    while state["step"] < train_cfg.steps:
        step = state["step"]
        for micro in range(train_cfg.grad_accum):
            batch = next(batches)
            # One generator per (seed, step, micro), the same on every process (each keeps its
            # slice of the global draw): resumed and multi-process runs draw the same noise.
            generator = torch.Generator(device).manual_seed(
                train_cfg.seed * 1_000_003 + step * 101 + micro * 7
            )
            with (
                accelerator.accumulate(),
                flop_counter(stats, step == 0 and micro == 0 and train_cfg.count_flops),
            ):
                loss = compute_loss(recipe, family, comps, objective, batch, generator, accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.num_processes > 1:
                    average_gradients(params, accelerator)
                grad_norm = None
                if accelerator.sync_gradients and train_cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(params, train_cfg.max_grad_norm)
                finite = nan_guard_ok(loss, grad_norm) if accelerator.sync_gradients else True
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach() / train_cfg.grad_accum
        state.update(step=step + 1, epoch=batch["epoch"], position=batch["position"])
        bad_steps = 0 if finite else bad_steps + 1
        if not finite:
            log.warning("step %d: non-finite loss or gradient; step skipped", step + 1)
            if bad_steps >= train_cfg.nan_patience:
                raise TunerError(
                    f"{bad_steps} steps in a row had non-finite loss/gradients; "
                    "stopped. Lower train.lr, or use bf16 instead of fp16; the last "
                    f"good checkpoint is in {output_dir / 'checkpoints'}"
                )
        scheduler.step()
        if step + 1 > te_stop:
            for group in optimizer.param_groups:
                if group.get("name") != "denoiser":
                    group["lr"] = 0.0  # text-encoder training is over (adapter.text_encoder_stop)
        bar.update(1)
        if (step + 1) % recipe.log.every == 0 or step + 1 == train_cfg.steps:
            logs = {"loss": (running / recipe.log.every).item(), "lr": scheduler.get_last_lr()[0]}
            if device.type == "cuda":
                logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            stats["log_times"].append((step + 1, time.perf_counter()))
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
            accelerator.log(logs, step=step + 1)
            running.zero_()
        save_now = recipe.output.save_every and (step + 1) % recipe.output.save_every == 0
        if save_now or stopper.requested:
            save_checkpoint(recipe, accelerator, trained, optimizer, scheduler, state, output_dir)
        if (
            recipe.sample.every
            and (step + 1) % recipe.sample.every == 0
            and step + 1 < train_cfg.steps
            and accelerator.is_main_process
        ):
            from tuner.sample import training_grid

            training_grid(recipe, output_dir, family, comps, step + 1, accelerator)
        if stopper.requested:
            bar.close()
            raise TunerError(
                f"stopped by {stopper.signal_name} at step {step + 1}; resume with: "
                f"./launch.sh RECIPE train.resume=latest output.dir={output_dir}"
            )
    bar.close()
    log.info("trained %d steps in %.1fs", train_cfg.steps - 0, time.perf_counter() - started)


@contextlib.contextmanager
def flop_counter(stats: dict, enabled: bool):
    """Count the FLOPs of one forward+backward (benchmarks' MFU); a no-op otherwise."""
    if not enabled:
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield
    stats["flops"] = float(counter.get_total_flops())


def average_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Mean of the LoRA gradients over processes, in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).to(grad.dtype)
        offset += grad.numel()


def nan_guard_ok(loss, grad_norm) -> bool:
    # The one host sync per optimizer step: the same cost as fp16's GradScaler check.
    flag = torch.isfinite(loss)
    if grad_norm is not None:
        flag = flag & torch.isfinite(torch.as_tensor(grad_norm))
    return bool(flag.item())


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(recipe, accelerator, trained, optimizer, scheduler, state, output_dir):
    def contents(folder: Path) -> None:
        if accelerator.is_main_process:
            adapters.save_adapter(folder, families.for_model(recipe.model), trained)
            lora = {
                f"{name}::{k}": v.detach().cpu().contiguous()
                for name, module in trained.items()
                for k, v in adapters.peft_state(module).items()
            }
            save_file(lora, str(folder / "lora_state.safetensors"))
            scaler = accelerator.scaler.state_dict() if accelerator.scaler else None
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "scaler": scaler,
                },
                folder / "training_state.pt",
            )
        accelerator.wait_for_everyone()

    checkpoint.write_checkpoint(
        output_dir,
        state["step"],
        contents,
        dict(state),
        accelerator.is_main_process,
        recipe.output.keep,
    )
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, trained, optimizer, scheduler, accelerator) -> dict:
    lora = load_file(str(folder / "lora_state.safetensors"))
    for name, module in trained.items():
        prefix = f"{name}::"
        weights = {k[len(prefix) :]: v for k, v in lora.items() if k.startswith(prefix)}
        # Loads into the adapter already injected: resuming never adds a second adapter.
        set_peft_model_state_dict(accelerator.unwrap_model(module), weights)
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng_state(saved["rng"])
    if saved.get("scaler") and accelerator.scaler:
        accelerator.scaler.load_state_dict(saved["scaler"])
    return checkpoint.read_state(folder)


def rng_state() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flat_config(recipe: Recipe) -> dict:
    """Dotted keys with scalar values: what tensorboard's hparams and wandb both accept."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat


def tracker_kwargs(recipe: Recipe) -> dict:
    name = recipe.log.run_name or Path(recipe.output.dir).name
    return {"wandb": {"name": name, "dir": recipe.output.dir}}


class GracefulStop:
    """SIGINT/SIGTERM finish the current step, save a checkpoint, and exit with a resume line."""

    def __init__(self):
        self.requested, self.signal_name = False, ""
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker)
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # a second Ctrl+C means "now"
        self.requested, self.signal_name = True, signal.Signals(signum).name

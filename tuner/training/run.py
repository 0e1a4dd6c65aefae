"""Training setup: one path for LoRA, DreamBooth and every family.

Reads top to bottom: data (before any model loads, so data errors come first), model, cache,
adapters, optimizer, data order, then the step loop (tuner/loop.py) and the outputs. Family
differences are behind `family.*` calls only.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from tuner import families, files
from tuner.adapters import lora, patterns
from tuner.data.buckets import bucket_histogram
from tuner.data.cache import CachePlan, TensorCache, build_cache, default_cache_dir
from tuner.data.dataset import TrainDataset
from tuner.data.items import collect_items, data_fingerprint
from tuner.data.sampler import BucketBatchSampler
from tuner.data.stream import batch_stream
from tuner.devices import place
from tuner.errors import TunerError
from tuner.families import checks, fp8, text_encoders
from tuner.inference.grids import pre_encode_sample_prompts
from tuner.recipe import Recipe
from tuner.training import block_swap, changes, checkpoint, dreambooth, sharding, validation
from tuner.training.ema import build_ema
from tuner.training.loop import Run, run_steps, stop_text_encoder_training
from tuner.training.optim import build_optimizer, build_scheduler, check_optimizer, has_eval_mode
from tuner.training.outputs import check_output_dir, claim_output_dir, finish_outputs
from tuner.training.speed import apply_speed_switches, check_speed_switches

log = logging.getLogger("tuner")
KEEP_CACHED_BYTES = 2**30  # per cache (latents, text)
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
    flops_per_step: float | None = None  # with count_flops


def train(recipe: Recipe) -> Path:
    """Train the recipe's adapter; returns the output directory."""
    return run_training(recipe).output_dir


def run_training(recipe: Recipe, *, count_flops: bool = False, around_steps=None) -> TrainingResult:
    """count_flops: count the first step's FLOPs (`tuner bench` reports MFU from it).
    around_steps: a context manager factory called with the Run around the step loop
    (`tuner bench --bare` times bare steps on the same model, adapter and batch there)."""
    output_dir = Path(recipe.output.dir)
    # The family's checks need no weights: a setting it cannot apply fails before anything
    # is written into output.dir (a hub model without model.family is checked after loading).
    family = families.known_for(recipe.model)
    if family is not None:
        family.validate(recipe)
    check_environment(recipe)
    resume_from = checkpoint.resolve_resume(recipe.train.resume, output_dir)
    # Nothing in output.dir changes until every check that can fail before training has
    # passed (data, model, the resumed recipe): a refused run leaves the folder as it was.
    ownership = check_output_dir(recipe, output_dir, resume_from)
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with=recipe.log.to or None,
        project_dir=str(output_dir),
    )
    is_main = accelerator.is_main_process
    if is_main and ownership.notice:
        log.warning("%s", ownership.notice)
    set_seed(recipe.train.seed, device_specific=True)

    # 1. Data first: a bad dataset fails before minutes of model loading. The run's own
    # output.dir is never read back as data (its sample grids), even inside a dataset folder.
    extra_sources = dreambooth.instance_sources(recipe)
    skip_dirs = {str(output_dir): "the output.dir"}
    items, report = collect_items(recipe.data, extra_sources, skip_dirs=skip_dirs)
    items, held_out = validation.held_out(recipe, items, skip_dirs)
    if held_out and not isinstance(recipe.data.validation, list):  # the split left fewer
        report.histogram = bucket_histogram([item.size for item in items])
    fingerprint = data_fingerprint(items)
    if is_main:
        log.info("%d training images in buckets:\n%s", len(items), report.histogram)
        if held_out:
            log.info("%d held-out validation images", len(held_out))
        notice = changes.data_notice(ownership.recorded.get("data"), fingerprint, resume_from)
        if notice:
            log.warning("%s", notice)

    # 2. Model: frozen, in the compute dtype.
    if family is None:
        family = families.for_model(recipe.model)
        family.validate(recipe)
    dtype = DTYPES[recipe.train.mixed_precision]
    comps = fp8.load_components(family, recipe.model, dtype)  # family.load, fp8 if asked
    comps = family.configure(comps, recipe)
    checks.check_reference_counts(family, comps, items + held_out)
    comps = text_encoders.mark(comps, recipe.model)
    comps.denoiser.requires_grad_(False)
    for module in comps.frozen_modules().values():
        module.requires_grad_(False).eval()
    # A rank no targeted layer can use fails now, not after the cache is built (a LoKr rank
    # above the factors' widths is legal: it means full Kronecker factors).
    targets = lora.denoiser_targets(recipe.adapter, family, comps.denoiser)
    if recipe.adapter.type != "lokr":
        lora.check_rank(recipe.adapter.rank, comps.denoiser, targets)
    patterns.check_adapter_patterns(recipe.adapter, comps.denoiser, targets)
    device = accelerator.device
    if accelerator.is_main_process:
        warn_long_captions(report.captions, comps.tokenizers)
    class_items = dreambooth.class_items(recipe, family, comps, accelerator)

    # 3. Encode once: latents and prompts go to the disk cache; encoders leave the GPU.
    plan = cache_plan(recipe, comps)
    with accelerator.main_process_first():
        stats = build_cache(
            items + class_items + held_out, recipe.data, plan, family, comps, device
        )
    if accelerator.is_main_process:  # the grids' prompts, while the encoders may be there
        pre_encode_sample_prompts(recipe, family, comps, device)
    if accelerator.is_main_process and (plan.latents or plan.texts):
        log.info(
            "cache: %d hit, %d made, %d skipped", stats["hit"], stats["made"], len(report.skipped)
        )
    place_frozen_modules(comps, plan, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # report training's peak, not caching's

    # 4. Adapters, optimizer, schedule. Re-seed: LoRA init must not depend on cache hits.
    set_seed(recipe.train.seed)
    trained = lora.inject(comps, recipe.adapter, family)
    if recipe.train.gradient_checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    block_swap.install(family, comps.denoiser, recipe.train.offload_blocks, device)
    comps.denoiser.to(device)
    if sharding.requested(accelerator):  # ./launch.sh --config-file recipes/accelerate/fsdp2.yaml
        sharding.check(recipe)
        sharding.shard(family, comps.denoiser, dtype)
        if is_main:
            log.info("FSDP2: the denoiser is sharded over %d processes", accelerator.num_processes)
    optimizer = build_optimizer(parameter_groups(trained, family, recipe), recipe.train, device)
    scheduler = build_scheduler(optimizer, recipe.train)
    # Only the optimizer is prepared (mixed precision, grad scaler): the models are not wrapped
    # in DDP; see update.average_gradients.
    optimizer = accelerator.prepare(optimizer)
    apply_speed_switches(recipe, comps, device)
    run = Run(
        recipe,
        accelerator,
        family,
        comps,
        trained,
        optimizer,
        scheduler,
        family.objective(comps, recipe.train),
        None,
        output_dir,
        count_flops=count_flops,
        record={
            "run_id": ownership.run_id,
            "recipe": recipe.model_dump(mode="json"),
            "data": fingerprint,
        },
    )
    run.ema = build_ema(run)  # from the initial weights; a checkpoint's average replaces it
    if resume_from is not None:
        run.state = checkpoint.load_training_state(resume_from, run)
        stop_text_encoder_training(run, run.state["step"])  # the lr the recipe gives now
        log.info("resumed from %s at step %d", resume_from, run.state["step"])
    if held_out:
        run.validation = validation.Validation(run, held_out, plan, resume_from)
    if is_main:
        claim_output_dir(recipe, output_dir, ownership)
    accelerator.wait_for_everyone()

    # 5. Data order: resumes at the saved (epoch, position).
    dataset = TrainDataset(items, recipe.data, plan, recipe.train.seed, class_items)
    sampler = BucketBatchSampler(
        [item.size for item in items],
        recipe.train.batch_size * accelerator.num_processes,
        seed=recipe.train.seed,
    )
    run.batches = batch_stream(dataset, sampler, run.state, accelerator, recipe.data.num_workers)
    if is_main and recipe.log.to:
        accelerator.init_trackers(
            recipe.log.project, config=flat_config(recipe), init_kwargs=tracker_kwargs(recipe)
        )

    # 6. Steps, then the outputs.
    try:
        with around_steps(run) if around_steps else contextlib.nullcontext():
            run_steps(run)
    finally:
        getattr(run.batches, "close", lambda: None)()  # the prefetch thread
    if has_eval_mode(run.optimizer):
        run.optimizer.eval()  # schedule-free: the outputs are its evaluation weights
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    accelerator.wait_for_everyone()
    with sharding.gathered(run):  # FSDP: every process gathers, the main one writes
        if accelerator.is_main_process:
            try:
                finish_outputs(
                    recipe,
                    output_dir,
                    family,
                    comps,
                    trained,
                    accelerator,
                    run.state["step"],
                    report,
                    ema=run.ema,
                )
            except files.WriteError as exc:  # the weights are in memory: keep them on disk
                raise checkpoint.keep_final_weights(run, exc) from exc
    accelerator.end_training()
    return TrainingResult(
        output_dir,
        family,
        comps,
        trained,
        run.state["step"],
        run.stats["log_times"],
        peak,
        run.stats["flops"],
    )


def check_environment(recipe: Recipe) -> None:
    """Settings this machine cannot apply are refused before anything loads, never ignored."""
    import os

    if recipe.train.mixed_precision == "fp16" and (
        not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU")
    ):
        raise TunerError(
            "train.mixed_precision: fp16 needs a CUDA GPU and this run is on the CPU; "
            "set train.mixed_precision=bf16 or no"
        )
    check_optimizer(recipe.train, recipe.adapter)
    if "wandb" in recipe.log.to:
        check_wandb()
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU")
    check_speed_switches(recipe.train, "cpu" if cpu else "cuda")


def check_wandb() -> None:
    import importlib.util
    import netrc
    import os

    if importlib.util.find_spec("wandb") is None:
        raise TunerError(
            "log.to: wandb is not installed; pip install wandb, or remove wandb from log.to"
        )
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("//")[-1]
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host.split("/")[0])
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise TunerError(
            "log.to: wandb has no API key (no WANDB_API_KEY, no `wandb login`); log in, set "
            "WANDB_MODE=offline to log locally, or remove wandb from log.to"
        )


def warn_long_captions(captions: list[str], tokenizers: dict) -> None:
    """One line when captions run past the (CLIP) tokenizer's limit: the rest is cut off."""
    limited = [
        (name, tok)
        for name, tok in tokenizers.items()
        if tok is not None and 0 < getattr(tok, "model_max_length", 0) <= 1024
    ]
    if not limited or not captions:
        return
    name, tok = min(limited, key=lambda pair: pair[1].model_max_length)
    limit = tok.model_max_length
    too_long = {c for c in set(captions) if len(tok(c, truncation=False).input_ids) > limit}
    long = [c for c in captions if c in too_long]
    if long:
        log.warning(
            "data: %d of %d captions are longer than the %d-token limit of %s (e.g. %r); "
            "the text past the limit is cut off",
            len(long),
            len(captions),
            limit,
            name,
            long[0][:60] + ("..." if len(long[0]) > 60 else ""),
        )


def cache_plan(recipe: Recipe, comps) -> CachePlan:
    data = recipe.data
    root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    # Loaded entries stay in memory (bounded); DataLoader workers would each keep a copy.
    keep = KEEP_CACHED_BYTES if data.num_workers == 0 else 0
    latents = TensorCache(root, "latents", keep) if data.cache else None
    crop = data.crop
    if latents is not None and crop == "random":
        log.warning(
            "data.crop=random is off while latents are cached (one crop is cached); "
            "set data.cache=false to train on random crops"
        )
        crop = "center"
    texts = TensorCache(root, "text", keep) if data.cache else None
    if texts is not None and recipe.adapter.text_encoder:
        texts = None  # the text encoders train, so their outputs change every step
    if texts is not None and data.shuffle_tags:
        log.warning(
            "data.shuffle_tags makes every step's prompt different: prompts are "
            "encoded each step instead of cached"
        )
        texts = None
    spec = comps.family.spec
    return CachePlan(
        latents, texts, comps.identity, crop, spec.reference_area, spec.prompt_reads_references
    )


def place_frozen_modules(comps, plan: CachePlan, device) -> None:
    """Encoders whose outputs are cached stay on the CPU during training; the others join the
    denoiser on the device."""
    place([comps.vae], "cpu" if plan.latents is not None else device)
    place(comps.text_encoders.values(), "cpu" if plan.texts is not None else device)


def parameter_groups(trained, family, recipe: Recipe) -> list[dict]:
    """The denoiser's LoRA in one group, or one per train.lr_pattern match plus the rest; each
    text encoder's in its own. All denoiser groups are named "denoiser"."""
    denoiser = trained[family.spec.denoiser]
    groups = [
        {**group, "name": "denoiser"}
        for group in patterns.lr_groups(denoiser, recipe.train.lr, recipe.train.lr_pattern)
    ]
    for name, module in trained.items():
        if name != family.spec.denoiser:
            groups.append(
                {
                    "params": lora.trainable_parameters(module),
                    "lr": recipe.adapter.text_encoder_lr or recipe.train.lr,
                    "name": name,
                }
            )
    return groups


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

"""`tuner plan`: what a recipe will hold on the GPU in each phase, before anything loads.

Phases, as the trainer runs them (training/run.py): caching puts the VAE alone, then the text
encoders together, on the GPU (the denoiser waits on the CPU); training holds the denoiser,
LoRA, gradients, optimizer state and one micro-step's activations (encoders stay on the CPU
when their outputs are cached); sampling grids bring the VAE and text encoders back next to
the training state. The verdict for a card compares the highest phase, plus the CUDA context
and the allocator's slack, with the card's memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tuner.errors import TunerError
from tuner.planning import offload, storage
from tuner.planning.build import meta_model
from tuner.planning.estimate import CACHE_BATCH, Tracer
from tuner.recipe import Recipe

GiB = 2**30
CARDS_GB = (12, 16, 24, 48, 80)
CUDA_CONTEXT = 0.5 * GiB  # the CUDA context and kernels, outside the allocator
ALLOCATOR_SLACK = 0.10  # reserved above allocated (fragmentation), as measured runs show


@dataclass
class Settings:
    """The recipe settings a switch may change."""

    quantize: str
    optimizer: str
    checkpointing: bool
    batch: int
    grad_accum: int
    offload_blocks: int = 0

    @classmethod
    def of(cls, recipe: Recipe) -> Settings:
        t = recipe.train
        return cls(recipe.model.quantize, t.optimizer, t.gradient_checkpointing, t.batch_size,
                   t.grad_accum, t.offload_blocks)  # fmt: skip


@dataclass
class Plan:
    model: str
    family: str
    note: str
    resolution: int
    components: dict  # name -> {params, bytes, kind}
    lora_params: int
    lora_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # one micro-step's peak above the weights (LoRA grads included)
    phases: dict  # name -> peak bytes
    peak_bytes: int
    peak_phase: str
    cards: dict  # "24" -> "fits" | "fits with: k=v ..." | "does not fit"
    flops_per_step: float | None = None  # one optimizer step (all micro-steps)
    seconds_per_step: float | None = None
    tflops: float | None = None
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{p} {b / GiB:.1f}" for p, b in self.phases.items()]
        fits = [gb for gb, verdict in self.cards.items() if verdict == "fits"]
        smallest = f"fits {fits[0]} GB cards" if fits else "fits none of 12-80 GB"
        line = (
            f"plan: peak {self.peak_bytes / GiB:.1f} GiB ({self.peak_phase}); "
            f"phases GiB: {', '.join(parts)}; {smallest}"
        )
        return line + (f" [{self.note}]" if self.note else "")

    def to_json(self) -> dict:
        return asdict(self)


def make_plan(
    recipe: Recipe,
    *,
    tflops: float | None = None,
    flops: bool = True,
    switches: bool = True,
    as_flop_counted: bool = False,
) -> Plan:
    """flops: count the step's FLOPs (a second trace). as_flop_counted: predict what `tuner
    bench --count-flops` measures, whose counted step runs under torch's FlopCounterMode (that
    mode keeps checkpointed activations alive)."""
    meta = meta_model(recipe)
    tracer = Tracer(meta, recipe)
    base = Settings.of(recipe)
    try:
        parts = predict(tracer, recipe, base, as_flop_counted)
    except (RuntimeError, NotImplementedError) as exc:  # an op that reads values from meta
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise TunerError(
            f"plan: the meta trace of {meta.family.spec.name} failed ({first}); "
            "this family cannot be planned yet"
        ) from exc
    cards = {}
    for gb in CARDS_GB:
        cards[str(gb)] = verdict(tracer, recipe, base, parts, gb, switches, as_flop_counted)
    flops_per_step = seconds = None
    if flops:
        _, micro = tracer.training_step(
            effective_batch(recipe, base.batch), base.checkpointing, size_of(recipe), flops=True
        )
        flops_per_step = micro * base.grad_accum
        seconds = flops_per_step / (tflops * 1e12) if tflops else None
    comps = meta.comps
    return Plan(
        model=recipe.model.path,
        family=meta.family.spec.name,
        note=meta.note,
        resolution=recipe.data.resolution,
        components={k: asdict(v) for k, v in parts["stored"].items()},
        lora_params=sum(p.numel() for p in tracer.lora_params()),
        lora_bytes=storage.gradient_bytes(tracer.lora_params()),
        gradient_bytes=parts["gradients"],
        optimizer_bytes=parts["optimizer"],
        activation_bytes=parts["activations"],
        phases=parts["phases"],
        peak_bytes=max(parts["phases"].values()),
        peak_phase=max(parts["phases"], key=parts["phases"].get),
        cards=cards,
        flops_per_step=flops_per_step,
        seconds_per_step=seconds,
        tflops=tflops,
        settings={**asdict(base), "dtype": str(comps.dtype).replace("torch.", "")},
    )


def size_of(recipe: Recipe) -> tuple[int, int]:
    return (recipe.data.resolution, recipe.data.resolution)


def effective_batch(recipe: Recipe, batch: int) -> int:
    """DreamBooth with prior preservation trains an instance and a class image per sample."""
    db = recipe.dreambooth
    return batch * 2 if db is not None and db.with_prior_preservation else batch


def predict(tracer: Tracer, recipe: Recipe, s: Settings, as_flop_counted: bool = False) -> dict:
    """Bytes per part and per phase for settings `s`."""
    comps, spec = tracer.comps, tracer.family.spec
    stored = {spec.denoiser: storage.stored(comps.denoiser, s.quantize)}
    # model.text_encoder_quantize (another branch adds it): the encoders' Linear weights.
    encoder_kind = getattr(recipe.model, "text_encoder_quantize", "none") or "none"
    for name, module in comps.frozen_modules().items():
        stored[name] = storage.stored(module, "none" if name == "vae" else encoder_kind)
    lora_params = tracer.lora_params()
    lora_bytes = storage.gradient_bytes(lora_params)
    gradients = storage.gradient_bytes(lora_params)
    optimizer = storage.optimizer_state_bytes(lora_params, s.optimizer)
    size = size_of(recipe)
    step, _ = tracer.training_step(
        effective_batch(recipe, s.batch), s.checkpointing, size, flops=as_flop_counted
    )
    activations = step
    if s.quantize in storage.QUANTIZED:
        # A quantized layer dequantizes its weight for the matmul, forward and backward.
        activations += 2 * tracer_max_linear(tracer)
        fitted = storage.FITTED_TRAINING_OVERHEAD.get(s.quantize, 0.0)
        activations += int(fitted * stored[spec.denoiser].quantized_params)
    cached = recipe.data.cache
    texts_cached = cached and not recipe.adapter.text_encoder and not recipe.data.shuffle_tags
    encoders = sum(v.bytes for k, v in stored.items() if k != "vae" and k != spec.denoiser)
    # train.offload_blocks: the swapped blocks' weights wait in host memory (two visit).
    away, visiting = offload.swapped_blocks(
        tracer.family, comps.denoiser, s.offload_blocks, s.quantize
    )
    denoiser_bytes = stored[spec.denoiser].bytes - away + visiting
    ema = recipe.train.ema
    # train.ema: one fp32 copy of the adapter, on the GPU unless ema.on_cpu.
    ema_bytes = lora_bytes if ema is not None and not ema.on_cpu else 0
    training = denoiser_bytes + lora_bytes + optimizer + ema_bytes + activations
    if s.grad_accum > 1:
        training += gradients  # held across the micro-steps
    if not cached:
        training += stored["vae"].bytes + tracer.vae(s.batch, size, decode=False)
    if not texts_cached:
        training += encoders
    phases = {}
    if cached or texts_cached:
        vae_phase = stored["vae"].bytes + tracer.vae(CACHE_BATCH, size, decode=False)
        resident = offload.encoding_bytes(
            comps.text_encoders,
            encoder_kind,
            streamed=bool(getattr(recipe.model, "text_encoder_offload", False)),
            one_at_a_time=getattr(tracer.family, "encoders_one_at_a_time", False),  # HiDream
        )
        text_phase = resident + tracer.text_encoders(CACHE_BATCH, size)
        phases["caching"] = max(vae_phase if cached else 0, text_phase if texts_cached else 0)
    phases["training"] = training
    if recipe.sample.prompts:
        weights = stored["vae"].bytes + denoiser_bytes
        if not keeps_encoders_off(recipe):
            weights += encoders
        phases["sampling"] = sampling_bytes(
            tracer, recipe, weights + lora_bytes + optimizer + ema_bytes
        )
    return {
        "stored": stored,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "phases": phases,
    }


def tracer_max_linear(tracer: Tracer) -> int:
    from tuner.planning.trace import max_linear_bytes

    return max_linear_bytes(tracer.comps.denoiser, 2)


def keeps_encoders_off(recipe: Recipe) -> bool:
    """Quantized or streamed encoders never join the denoiser on the GPU: the grids' prompts
    are encoded in the caching phase (text_encoders.keep_off_device)."""
    model = recipe.model
    return model.text_encoder_quantize != "none" or model.text_encoder_offload


def sampling_bytes(tracer: Tracer, recipe: Recipe, resident: int) -> int:
    """Grids during training: the modules on the GPU (`resident`: the denoiser, the VAE, the
    text encoders unless their prompts were encoded beforehand, LoRA and optimizer state);
    one pipeline call renders all prompts x seeds of a scale, doubled by classifier-free
    guidance unless the denoiser embeds guidance itself (Flux dev)."""
    sample = recipe.sample
    width = sample.width or recipe.data.resolution
    height = sample.height or recipe.data.resolution
    batch = len(sample.prompts) * len(sample.seeds)
    if sample.guidance > 1 and tracer.comps.guidance is None:
        batch *= 2
    step = tracer.denoiser_forward(batch, (width, height))
    decode = tracer.vae(1, (width, height), decode=True)
    return resident + max(step, decode)


def fits(phases: dict, gb: int) -> bool:
    peak = max(phases.values())
    return peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT <= gb * GiB


def switch_candidates(recipe: Recipe, tracer: Tracer) -> list[tuple[str, dict]]:
    """Switches in order of cost (speed and quality lost), cheapest first. Block swap is last
    (it costs a copy per swapped block each step); its N is searched in verdict."""
    spec = tracer.family.spec
    out = [("train.optimizer=adamw8bit", {"optimizer": "adamw8bit"})]
    out.append(("train.gradient_checkpointing=true", {"checkpointing": True}))
    out.append(("model.quantize=fp8", {"quantize": "fp8"}))  # every family (families/fp8.py)
    if spec.quantize:
        out.append(("model.quantize=nf4", {"quantize": "nf4"}))
    if offload.block_count(tracer.family, tracer.comps.denoiser):
        out.append(("train.offload_blocks=N", {"offload_blocks": None}))
    return out


def verdict(tracer, recipe, base: Settings, parts, gb: int, switches: bool, counted) -> str:
    if fits(parts["phases"], gb):
        return "fits"
    if not switches:
        return "does not fit"
    current, applied = Settings(**asdict(base)), []
    steps = switch_candidates(recipe, tracer)
    if base.batch > 1:
        accum = base.batch * base.grad_accum
        steps.append(
            (f"train.batch_size=1 train.grad_accum={accum}", {"batch": 1, "grad_accum": accum})
        )
    for label, change in steps:
        if "offload_blocks" in change:
            if current.quantize in ("nf4", "int8"):
                continue  # refused together (families/checks.py)
            found = fewest_offloaded_blocks(tracer, recipe, current, gb, counted)
            if found is None:
                continue
            current = Settings(**{**asdict(current), "offload_blocks": found})
            return "fits with: " + " ".join([*applied, f"train.offload_blocks={found}"])
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        if "quantize" in change and rank(change["quantize"]) <= rank(current.quantize):
            continue  # never back to a larger storage kind
        current = Settings(**{**asdict(current), **change})
        applied = [
            a for a in applied if not (a.startswith("model.quantize") and "quantize" in change)
        ]
        applied.append(label)
        if fits(predict(tracer, recipe, current, counted)["phases"], gb):
            return "fits with: " + " ".join(applied)
    return "does not fit"


def rank(quantize: str) -> int:
    """Storage kinds from the largest to the smallest."""
    return {"none": 0, "fp8": 1, "int8": 1, "nf4": 2}.get(quantize, 0)


def fewest_offloaded_blocks(tracer, recipe, current: Settings, gb: int, counted) -> int | None:
    """The smallest N of train.offload_blocks that fits `gb` with the other settings as they
    are (only weights move, so each try re-traces nothing), or None when all blocks do not."""
    total = offload.block_count(tracer.family, tracer.comps.denoiser)

    def fits_with(n: int) -> bool:
        settings = Settings(**{**asdict(current), "offload_blocks": n})
        return fits(predict(tracer, recipe, settings, counted)["phases"], gb)

    low, high = max(current.offload_blocks, 0) + 1, total
    if low > high or not fits_with(high):
        return None
    while low < high:  # the peak falls as N grows: the first N that fits
        middle = (low + high) // 2
        if fits_with(middle):
            high = middle
        else:
            low = middle + 1
    return low

"""The recipe schema: typed sections, each forbidding unknown keys, so a typo is an error rather
than a silently ignored setting."""

from __future__ import annotations

import logging
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    # inf/nan are never a meaningful setting (train.lr=inf trains nothing but NaNs).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(Section):
    path: str
    family: str | None = None
    revision: str | None = None
    variant: str | None = None
    vae_path: str | None = None
    config: str | None = None  # diffusers folder/hub id whose configs a single file uses
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"
    drop_t5: bool = False  # sd3: leave T5-XXL out (zeros in its place), as diffusers allows
    allow_pickle: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from tuner.families import names  # the registry: no second list of families

        if value is not None and value not in names():
            raise ValueError(f"unknown family {value!r}; expected one of {', '.join(names())}")
        return value


class AdapterSection(Section):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dora: bool = False
    targets: list[str] | None = None
    target_regex: str | None = None
    text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)
    text_encoder_stop: float = Field(1.0, gt=0, le=1)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


class BucketSection(Section):
    enabled: bool = True
    area: int | None = Field(None, ge=64 * 64)
    step: int = Field(64, ge=8)
    min_side: int = Field(256, ge=8)
    max_side: int = Field(2048, ge=8)
    max_ratio: float = Field(2.0, ge=1.0)
    no_upscale: bool = False


class DatasetEntry(Section):
    path: str
    caption_ext: str = ".txt"
    caption_column: str | None = None
    image_column: str | None = None
    split: str = "train"
    repeats: int = Field(1, ge=1)
    prefix: str = ""
    suffix: str = ""
    default_caption: str = ""
    resolution: int | None = Field(None, ge=8)


class DataSection(Section):
    datasets: list[DatasetEntry] = Field(default_factory=list)
    resolution: int = Field(512, ge=8)
    buckets: bool | BucketSection = False
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    caption_dropout: float = Field(0.0, ge=0, le=1)
    shuffle_tags: bool = False
    keep_tokens: int = Field(0, ge=0)
    cache: bool = True
    cache_dir: str | None = None
    num_workers: int = Field(0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(
                f"resolution {value} is not a multiple of 8; use e.g. {value // 8 * 8}"
            )
        if value > 4096:
            raise ValueError(f"resolution {value} is absurd for these models; use at most 4096")
        return value

    @property
    def bucket_options(self) -> BucketSection | None:
        if isinstance(self.buckets, BucketSection):
            return self.buckets if self.buckets.enabled else None
        return BucketSection() if self.buckets else None


class DreamBoothSection(Section):
    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    class_dir: str | None = None
    num_class_images: int = Field(100, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    with_prior_preservation: bool = True
    class_generation_batch: int = Field(4, ge=1)
    class_generation_steps: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _class_prompt_needed(self) -> DreamBoothSection:
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError(
                "with_prior_preservation is on but class_prompt is empty; set "
                "dreambooth.class_prompt (e.g. 'a photo of a dog') or turn prior preservation off"
            )
        return self


class FlowSection(Section):
    """Flow-matching families (sd3, flux): how sigmas are drawn, shifted and weighted."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode", "sigmoid"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float | None = Field(None, gt=0)
    resolution_shift: bool | None = None
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"


# train.<key> spellings of train.flow.<key>, read for one release with a deprecation line.
FLAT_FLOW_KEYS = tuple(FlowSection.model_fields)


class TrainSection(Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    offload_blocks: int = Field(0, ge=0)  # block swap: the first N blocks' weights in host RAM
    max_grad_norm: float | None = Field(1.0, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    flow: FlowSection = Field(default_factory=FlowSection)
    guidance: float = 1.0  # the value a guidance-distilled denoiser (Flux dev) embeds
    max_sequence_length: int | None = Field(None, ge=1)  # T5 tokens (sd3, flux)
    resume: str | None = None
    nan_patience: int = Field(20, ge=1)
    compile: bool = False

    @model_validator(mode="before")
    @classmethod
    def _flat_flow_keys(cls, raw):
        """Old recipes wrote the flow keys flat in train; move them, with a line saying how."""
        if not isinstance(raw, dict) or not any(key in raw for key in FLAT_FLOW_KEYS):
            return raw
        raw = dict(raw)
        flow = raw.get("flow")
        flow = dict(flow) if isinstance(flow, dict) else {}
        for key in [k for k in FLAT_FLOW_KEYS if k in raw]:
            if key in flow:
                raise ValueError(
                    f"{key} is set both flat and under train.flow; keep train.flow.{key}"
                )
            flow[key] = raw.pop(key)
            logging.getLogger("tuner").warning(
                "train.%s is deprecated and will be removed in the next release; "
                "write it as train.flow.%s",
                key,
                key,
            )
        raw["flow"] = flow
        return raw


class SampleSection(Section):
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    every: int = Field(0, ge=0)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    scheduler: Literal["default", "euler", "euler_a", "dpm++2m", "ddim"] = "default"


class OutputSection(Section):
    dir: str
    save_every: int = Field(0, ge=0)
    keep: int = Field(3, ge=1)
    overwrite: bool = False
    formats: list[Literal["diffusers", "kohya"]] = Field(
        default_factory=lambda: ["diffusers", "kohya"]
    )
    name: str | None = None


class LogSection(Section):
    to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    every: int = Field(10, ge=1)
    project: str = "tuner"
    run_name: str | None = None


class Recipe(Section):
    model: ModelSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection
    sample: SampleSection = Field(default_factory=SampleSection)
    output: OutputSection
    log: LogSection = Field(default_factory=LogSection)
    dreambooth: DreamBoothSection | None = None
    # Where it came from, so messages can print a command that reproduces or resumes the run.
    _source: str | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    def command(self, *extra: str) -> str:
        """The launch command for this recipe (its file, its overrides, plus `extra`), with the
        launcher flags it was started with: launch.sh exports TUNER_NUM_PROCESSES and
        TUNER_CONFIG_FILE when given them; a plain `accelerate launch` sets WORLD_SIZE."""
        import os
        import shlex

        flags = []
        processes = os.environ.get("TUNER_NUM_PROCESSES")
        if not processes and int(os.environ.get("WORLD_SIZE") or 1) > 1:
            processes = os.environ["WORLD_SIZE"]
        if processes:
            flags += ["--num-processes", processes]
        if os.environ.get("TUNER_CONFIG_FILE"):
            flags += ["--config-file", os.environ["TUNER_CONFIG_FILE"]]
        parts = [*flags, self._source or "RECIPE", *self._overrides, *extra]
        return "./launch.sh " + " ".join(shlex.quote(p) for p in parts)

    @model_validator(mode="after")
    def _has_data(self) -> Recipe:
        if not self.data.datasets and self.dreambooth is None:
            raise ValueError("no training data; add data.datasets (a list) or a dreambooth section")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

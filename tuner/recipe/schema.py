"""The recipe schema: typed sections, each forbidding unknown keys (tuner.recipe.section), so a
typo is an error rather than a silently ignored setting. The train section is in
tuner.recipe.train_section."""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from tuner.recipe.section import Section, check_regex
from tuner.recipe.train_section import TrainSection


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
    # The text encoders for the caching phase: bitsandbytes-quantized, and/or streamed from the
    # CPU layer by layer (families/text_encoders.py).
    text_encoder_quantize: Literal["none", "nf4", "int8"] = "none"
    text_encoder_offload: bool = False
    allow_pickle: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from tuner.families import names  # the registry: no second list of families

        if value is not None and value not in names():
            raise ValueError(f"unknown family {value!r}; expected one of {', '.join(names())}")
        return value


class AdapterSection(Section):
    type: Literal["lora", "loha", "lokr"] = "lora"
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # LoHa / LoKr only (peft's LoHaConfig / LoKrConfig); tuner.adapters.lycoris refuses them
    # with lora, and the LoRA-only keys above with loha / lokr.
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    effective_conv: bool = False  # peft use_effective_conv2d (LyCORIS use_tucker)
    decompose_both: bool = False  # lokr only
    decompose_factor: int = Field(-1, ge=-1)  # lokr only; -1: near-square factors
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dora: bool = False
    targets: list[str] | None = None
    target_regex: str | None = None
    text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)
    text_encoder_stop: float = Field(1.0, gt=0, le=1)
    # Denoiser module pattern -> rank / alpha (peft's LoraConfig fields of the same names).
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_values(cls, value: dict, info) -> dict:
        for key, number in value.items():
            check_regex(key, f"adapter.{info.field_name}")
            if number <= 0:
                raise ValueError(f"{key!r}: {number} must be > 0")
        return value

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
    # A folder of masks with the images' stems (subfolders mirrored): white trains, black not.
    mask_dir: str | None = None

    # Paired (editing) data: the reference image of each target. control_dir: a folder of
    # same-stem files; control_column: a metadata/HF column (one image or a list of them).
    control_dir: str | None = None
    control_column: str | None = None

    @model_validator(mode="after")
    def _one_control_source(self) -> DatasetEntry:
        if self.control_dir and self.control_column:
            raise ValueError("control_dir and control_column both set; name the references one way")
        return self

    @property
    def paired(self) -> bool:
        return bool(self.control_dir or self.control_column)


class ValidationSplit(Section):
    """Hold out a fraction of the training images (chosen by a seeded hash of each image)."""

    split: float = Field(gt=0, lt=1)
    seed: int = 0


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
    alpha_mask: bool = False  # the images' alpha channel is the loss mask
    unmasked_weight: float = Field(0.0, ge=0, le=1)  # loss weight where the mask is black
    # Held-out data for train.validate_every: dataset entries, or {split: 0.1} of the train set.
    validation: list[DatasetEntry] | ValidationSplit | None = None

    @model_validator(mode="after")
    def _mask_settings_apply(self) -> DataSection:
        masked = [i for i, e in enumerate(self.datasets) if e.mask_dir]
        if self.alpha_mask and masked:
            raise ValueError(
                f"data.alpha_mask and data.datasets[{masked[0]}].mask_dir both give masks; "
                "use one of them"
            )
        if isinstance(self.validation, list) and not self.validation:
            raise ValueError("data.validation is an empty list; add entries or remove it")
        return self

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
    mask_dir: str | None = None  # masks of the instance images (same stems), as datasets[]

    @model_validator(mode="after")
    def _class_prompt_needed(self) -> DreamBoothSection:
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError(
                "with_prior_preservation is on but class_prompt is empty; set "
                "dreambooth.class_prompt (e.g. 'a photo of a dog') or turn prior preservation off"
            )
        return self


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
    controls: list[str] = Field(default_factory=list)  # editing families: one image per prompt


class OutputSection(Section):
    dir: str
    save_every: int = Field(0, ge=0)
    keep: int = Field(3, ge=1)
    overwrite: bool = False
    formats: list[Literal["diffusers", "kohya"]] = Field(
        default_factory=lambda: ["diffusers", "kohya"]
    )
    name: str | None = None
    keep_best: bool = False  # keep the checkpoint of the lowest validation loss in best/


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
        self._check_masks_and_validation()
        return self

    def _check_masks_and_validation(self) -> None:
        """Mask, validation and keep_best settings that cannot apply are refused."""
        data = self.data
        has_mask_dir = any(e.mask_dir for e in data.datasets) or bool(
            self.dreambooth and self.dreambooth.mask_dir
        )
        if data.unmasked_weight and not (has_mask_dir or data.alpha_mask):
            raise ValueError(
                "data.unmasked_weight applies to masked loss only; set data.datasets[].mask_dir "
                "or data.alpha_mask=true, or remove it"
            )
        if self.dreambooth and self.dreambooth.mask_dir and data.alpha_mask:
            raise ValueError(
                "data.alpha_mask and dreambooth.mask_dir both give masks; use one of them"
            )
        if data.validation is not None and not self.train.validate_every:
            raise ValueError(
                "data.validation is set but train.validate_every is 0; set "
                "train.validate_every (e.g. 50) or remove data.validation"
            )
        if self.train.validate_every and data.validation is None:
            raise ValueError(
                "train.validate_every needs held-out data; set data.validation (dataset "
                "entries, or {split: 0.1})"
            )
        if self.output.keep_best and not self.train.validate_every:
            raise ValueError(
                "output.keep_best needs a validation loss; set data.validation and "
                "train.validate_every, or remove output.keep_best"
            )
        if self.train.ema and self.train.ema.start_step >= self.train.steps:
            raise ValueError(
                f"train.ema.start_step {self.train.ema.start_step} is not before train.steps "
                f"{self.train.steps}: the average would be the final weights; lower it"
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

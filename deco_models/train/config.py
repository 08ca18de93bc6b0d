"""Training configuration: four small dataclasses (model, data, train, lora) read from YAML, with dotted overrides.

A YAML recipe looks like::

    model: {vision_name_or_path: openai/clip-vit-large-patch14-336, llm_name_or_path: lmsys/vicuna-7b-v1.5,
            projector: avgpool2_144}
    data: {data_path: blip_laion_cc_sbu_558k.json, image_folder: images, template: plain}
    train: {stage: align, output_dir: runs/avgpool2_144-align, lr: 1.0e-3, per_device_batch_size: 32}

>>> cfg = TrainConfig.from_dict({"data": {"data_path": "x.json"}, "train": {"output_dir": "out"}})
>>> cfg = cfg.with_overrides(["train.lr=1e-4", "lora.r=8"])
>>> cfg.train.lr, cfg.lora.r
(0.0001, 8)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("align", "finetune")


@dataclass
class ModelArgs:
    """Which model to train. Exactly one source: ``builder``, ``name_or_path``, or ``vision_name_or_path`` +
    ``llm_name_or_path`` + ``projector`` (LLaVA's way: a pretrained CLIP and a pretrained LLM joined by a fresh
    projector)."""

    name_or_path: str | None = None  # a saved deco / llava-hf model directory
    vision_name_or_path: str | None = None
    llm_name_or_path: str | None = None
    projector: str | None = None  # spec string: mlp2x_gelu, qformer2_144, avgpool2_144, cabstractor_144, ...
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS (LLaVA-1.5), "full" keeps it
    pretrained_projector: str | None = None  # align output: projector.safetensors / mm_projector.bin (or its dir)
    builder: str | None = None  # "package.module:function" returning (model, processor)
    builder_kwargs: dict = field(default_factory=dict)
    torch_dtype: str | None = None  # float32 / bfloat16 / float16 (weights); None keeps what the source has
    attn_implementation: str | None = None  # sdpa / eager / flash_attention_2


@dataclass
class DataArgs:
    """Where the LLaVA-format data is and how it is rendered (:class:`deco_models.data.LlavaConversationDataset`)."""

    data_path: str | None = None
    image_folder: str | None = None
    template: str | None = None  # default: plain for align, vicuna_v1 for finetune
    image_aspect: str | None = None  # pad (LLaVA-1.5) / square; None: the processor's setting
    on_bad_image: str = "skip"
    check_images: str = "exists"
    max_length: int | None = 2048
    group_by_length: bool = True  # modality-aware length grouping (LLaVA's group_by_modality_length)
    num_workers: int = 0


@dataclass
class OptimArgs:
    """Stage, optimisation and checkpointing. Global batch = per_device_batch_size * gradient_accumulation_steps *
    number of processes (the paper: 256 for align, 128 for finetune)."""

    stage: str = "align"
    output_dir: str | None = None
    lr: float = 1e-3
    projector_lr: float | None = None  # finetune: LLaVA's mm_projector_lr (2e-5); None = lr
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta2: float = 0.999
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 1
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None
    gradient_checkpointing: bool = False
    freeze_vision: bool = True
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json)
    fsdp: str | None = None  # e.g. "full_shard auto_wrap" (or launch with accelerate --config_file fsdp2.yaml)
    fsdp_config: dict | None = None
    report_to: str | list[str] = "auto"  # auto = tensorboard when installed, else none
    ddp_find_unused_parameters: bool | None = None  # None: True when the data mixes text-only and image records
    save_merged: bool = False  # also write a standalone model (LoRA merged) to output_dir/merged at the end
    training_args: dict = field(default_factory=dict)  # any other transformers.TrainingArguments keys


@dataclass
class LoraArgs:
    """LoRA on the LLM's linear layers (finetune stage); LLaVA-1.5's recipe: r 128, alpha 256, dropout 0.05."""

    enable: bool | None = None  # None: on for finetune, off for align
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every nn.Linear inside the language model (not lm_head)
    # LLM parameters trained in full beside the adapters, matched by a substring of a dotted name component
    # ("norm": every RMSNorm, "embed_tokens", "lm_head"); LLaVA's layout keeps them in non_lora_trainables.
    full_train: list[str] | None = None


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: OptimArgs = field(default_factory=OptimArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)

    # -- construction -----------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build from nested dicts; unknown sections or keys raise ``ValueError`` listing the valid ones."""
        values = dict(values or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = _SECTION_CLASSES[f.name]
            section = values.get(f.name) or {}
            if isinstance(section, section_cls):
                kwargs[f.name] = section
                continue
            if not isinstance(section, dict):
                raise ValueError(f"config section {f.name!r} must be a mapping, got {type(section).__name__}")
            names = {g.name for g in dataclasses.fields(section_cls)}
            bad = set(section) - names
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in section {f.name!r}; valid keys: {sorted(names)}")
            kwargs[f.name] = section_cls(**section)
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections (model, data, train, lora)")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> TrainConfig:
        """Return a copy with dotted overrides applied: ``["train.lr=1e-4"]`` or ``{"train.lr": 1e-4}``. Values
        given as strings are parsed as YAML scalars (``1e-4`` -> float, ``true`` -> bool, ``null`` -> None)."""
        values = self.to_dict()
        pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        for key, value in pairs.items():
            parts = key.split(".")
            if len(parts) != 2:
                raise ValueError(f"override key {key!r} must be SECTION.KEY (e.g. train.lr), sections: {list(values)}")
            section, name = parts
            if section not in values:
                raise ValueError(f"override {key!r}: unknown section {section!r}; expected one of {list(values)}")
            if name not in values[section]:
                raise ValueError(f"override {key!r}: unknown key {name!r}; valid keys: {sorted(values[section])}")
            values[section][name] = _parse_value(value) if isinstance(value, str) else value
        return TrainConfig.from_dict(values)

    # -- checks -----------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        if self.train.stage not in STAGES:
            raise ValueError(f"train.stage must be one of {STAGES}, got {self.train.stage!r}")
        if self.train.bf16 and self.train.fp16:
            raise ValueError("train.bf16 and train.fp16 are exclusive")
        for name in ("lr", "warmup_ratio", "weight_decay"):
            if float(getattr(self.train, name)) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self.train, name)}")
        if not 0 <= float(self.train.warmup_ratio) < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.train.warmup_ratio}")
        if self.train.per_device_batch_size < 1 or self.train.gradient_accumulation_steps < 1:
            raise ValueError("train.per_device_batch_size and train.gradient_accumulation_steps must be >= 1")
        if self.lora.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.lora.r}")
        sources = [bool(self.model.builder), bool(self.model.name_or_path),
                   bool(self.model.vision_name_or_path or self.model.llm_name_or_path)]
        if sum(sources) > 1:
            raise ValueError(
                "give exactly one model source: model.builder, model.name_or_path, or "
                "model.vision_name_or_path + model.llm_name_or_path + model.projector"
            )
        if (self.model.vision_name_or_path or self.model.llm_name_or_path) and not (
            self.model.vision_name_or_path and self.model.llm_name_or_path and self.model.projector
        ):
            raise ValueError("model.vision_name_or_path, model.llm_name_or_path and model.projector go together")

    @property
    def use_lora(self) -> bool:
        return self.lora.enable if self.lora.enable is not None else self.train.stage == "finetune"

    @property
    def template(self) -> str:
        return self.data.template or ("plain" if self.train.stage == "align" else "vicuna_v1")


_SECTION_CLASSES = {"model": ModelArgs, "data": DataArgs, "train": OptimArgs, "lora": LoraArgs}


def _parse_value(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string (it wants "1.0e-4"): accept the usual float spellings too.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """Turn ``["--train.lr", "1e-4", "lora.r=8", "--train.bf16=true"]`` into ``{"train.lr": 1e-4, ...}``.

    >>> parse_overrides(["--train.lr", "1e-4", "lora.r=8"])
    {'train.lr': 0.0001, 'lora.r': 8}
    """
    result: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        key = token[2:] if token.startswith("--") else token
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif token.startswith("--") and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        elif token.startswith("--"):
            value = "true"  # a bare flag: --train.bf16
            i += 1
        else:
            raise ValueError(f"cannot read override {token!r}: use SECTION.KEY=VALUE or --SECTION.KEY VALUE")
        if "." not in key:
            raise ValueError(f"override {token!r}: the key must be SECTION.KEY (e.g. train.lr)")
        result[key] = _parse_value(value)
    return result

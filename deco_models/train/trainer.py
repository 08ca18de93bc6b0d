"""Training on transformers' Trainer: :class:`DecoTrainer` and the one-call API :func:`train`.

What the subclass adds to ``transformers.Trainer`` (no loop of its own):

- the modality-aware length-grouped sampler (:class:`deco_models.data.LengthGroupedSampler`);
- two optimizer parameter groups, projector (``train.projector_lr``) and the rest (``train.lr``, LoRA);
- throughput (samples/s, tokens/s, step time) and the projector learning rate in the logs;
- align checkpoints that hold only the trained tensors (``trainable.safetensors``, not a 7B copy of frozen weights);
- crash-safe checkpoints: a completion marker after each save, rotation only after it (see
  :mod:`deco_models.train.checkpoints`).

Resuming (``--resume``) restores the model's trained tensors, optimizer, scheduler, RNG states and the position in
the (seeded, deterministic) data order, so a killed run ends where an uninterrupted one does: on CPU the final loss
matches to 1e-5 relative (tested with a SIGKILL; in practice bit-identical). On GPUs, nondeterministic kernels
(atomics in attention/backward) make the runs differ at the level of run-to-run noise even without a kill.

Launch on one process, or on many with ``torchrun --nproc-per-node N -m deco_models.cli train --config X.yaml`` /
``accelerate launch [--config_file configs/accelerate/fsdp2.yaml] -m deco_models.cli train ...``; DeepSpeed with
``train.deepspeed: deco_models/configs/deepspeed/zero2.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from deco_models.data.llava import LengthGroupedSampler, LlavaCollator, LlavaConversationDataset
from deco_models.train import checkpoints as ckpt
from deco_models.train.callbacks import CSVLoggerCallback
from deco_models.train.config import TrainConfig
from deco_models.train.stages import (
    PROJECTOR_NAME,
    TRAINABLE_NAME,
    is_projector_parameter,
    load_pretrained_projector,
    prepare_model_for_stage,
    save_projector,
)

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.csv"
CONFIG_NAME = "train_config.yaml"


class DecoTrainer(Trainer):
    """``transformers.Trainer`` with the DeCo/LLaVA training details (see the module docstring).

    Args (keyword, on top of Trainer's):
        projector_lr: learning rate of the projector's parameter group (None: ``args.learning_rate``).
        group_by_length: use the modality-aware length-grouped sampler when the dataset has ``modality_lengths``.
        save_trainable_only: checkpoints hold only ``requires_grad`` tensors (align stage without peft).
    """

    def __init__(self, *args, projector_lr: float | None = None, group_by_length: bool = True,
                 save_trainable_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_length = group_by_length
        self.save_trainable_only = save_trainable_only
        self._projector_group_ids: list[int] = []
        self._projector_lr: float | None = None
        self._reset_throughput()

    # -- data -------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "modality_lengths", None)
        if self.group_by_length and lengths:
            # LLaVA: megabatches of world_size * grad_accum * batch, split evenly so ranks see similar lengths.
            return LengthGroupedSampler(
                lengths,
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    # -- optimizer --------------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        base_lr = self.args.learning_rate
        projector_lr = self.projector_lr if self.projector_lr is not None else base_lr
        groups, self._projector_group_ids = [], []
        for projector in (False, True):
            for with_decay in (True, False):
                params = [
                    p for n, p in opt_model.named_parameters()
                    if p.requires_grad and is_projector_parameter(n) == projector and (n in decay) == with_decay
                ]
                if not params:
                    continue
                if projector:
                    self._projector_group_ids.append(len(groups))
                groups.append({
                    "params": params,
                    "weight_decay": self.args.weight_decay if with_decay else 0.0,
                    "lr": projector_lr if projector else base_lr,
                })
        if not groups:
            raise ValueError("no trainable parameters: check train.stage / lora settings")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)  # per group
        self.optimizer = optimizer_cls(groups, lr=base_lr, **optimizer_kwargs)
        return self.optimizer

    # -- throughput -------------------------------------------------------------------------------------------------

    def _reset_throughput(self) -> None:
        self._tp_start: float | None = None
        self._tp_samples = 0
        self._tp_tokens = 0
        self._tp_step = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._tp_start is None:
            self._tp_start, self._tp_step = time.perf_counter(), self.state.global_step
        if self.optimizer is not None and self._projector_group_ids:
            # The rate this step uses (the scheduler steps after the optimizer), like the Trainer's learning_rate.
            self._projector_lr = self.optimizer.param_groups[self._projector_group_ids[0]]["lr"]
        self._tp_samples += int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._tp_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._tp_start is not None:
            elapsed = time.perf_counter() - self._tp_start
            steps = max(1, self.state.global_step - (self._tp_step or 0))
            world = max(1, self.args.world_size)
            if elapsed > 0:
                logs["step_time_s"] = elapsed / steps
                logs["samples_per_second"] = self._tp_samples * world / elapsed
                logs["tokens_per_second"] = self._tp_tokens * world / elapsed
            # Windows run log to log, so data loading between steps counts (honest throughput).
            self._tp_start, self._tp_step = time.perf_counter(), self.state.global_step
            self._tp_samples = self._tp_tokens = 0
        if "loss" in logs and self._projector_lr is not None:
            logs["projector_lr"] = self._projector_lr
        super().log(logs, start_time)

    # -- saving -----------------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.save_trainable_only:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        from deco_models.io import atomic_write

        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if state_dict is None:
            state_dict = model.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k in trainable}
        atomic_write(os.path.join(output_dir, TRAINABLE_NAME), lambda tmp: save_file(state, tmp, {"format": "pt"}))
        save_projector(model, os.path.join(output_dir, PROJECTOR_NAME))
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if not (self.save_trainable_only and os.path.isfile(path)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from deco_models.io import load_state_dict

        model = model if model is not None else self.model
        state = load_state_dict(path)
        missing = set(state) - set(model.state_dict())
        if missing:
            raise ValueError(f"{path} has tensors the model lacks: {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)
        logger.info("resumed %d trained tensors from %s", len(state), path)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # safetensors writes model/adapter files owner-only (0600); they get the umask's normal mode like the rest.
        from rgae.io import normal_file_modes

        with normal_file_modes(output_dir if output_dir is not None else self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        # Rotation is deferred until the new checkpoint is marked complete, so a kill mid-save never leaves us with
        # only a half-written checkpoint.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng states, shards)
        if self.args.should_save:
            ckpt.mark_complete(folder, self.state.global_step)
            ckpt.rotate_complete_checkpoints(run_dir, limit)


# ---------------------------------------------------------------------------------------------------------------------
# The one-call API
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns. ``final_loss`` is the last logged training loss (``train.logging_steps``)."""

    output_dir: str
    global_step: int
    final_loss: float | None
    log_csv: str
    model: Any = field(repr=False, default=None)
    processor: Any = field(repr=False, default=None)
    trainer: Any = field(repr=False, default=None)
    metrics: dict = field(default_factory=dict)
    skipped_images: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    resumed_from: str | None = None


def _coerce_config(config: TrainConfig | dict | str | os.PathLike) -> TrainConfig:
    if isinstance(config, TrainConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return TrainConfig.from_yaml(config)


def _import_callable(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model.builder must be 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def _dtype(name: str | None):
    if name is None:
        return None
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"model.torch_dtype {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return getattr(torch, name)


def build_model(config: TrainConfig) -> tuple[Any, Any]:
    """(model, processor) from ``config.model`` (builder, saved model, or vision + LLM + projector)."""
    margs = config.model
    if margs.builder:
        built = _import_callable(margs.builder)(**margs.builder_kwargs)
        if not (isinstance(built, tuple) and len(built) == 2):
            raise ValueError(f"model.builder {margs.builder!r} must return (model, processor)")
        return built
    kwargs = {}
    if margs.torch_dtype:
        kwargs["dtype"] = _dtype(margs.torch_dtype)
    if margs.attn_implementation:
        kwargs["attn_implementation"] = margs.attn_implementation
    if margs.name_or_path:
        import deco_models

        return deco_models.load(margs.name_or_path, **kwargs)
    if margs.vision_name_or_path:
        return _assemble_from_parts(config, kwargs)
    raise ValueError("no model: set model.name_or_path, model.builder, or vision/llm paths + projector")


def _assemble_from_parts(config: TrainConfig, load_kwargs: dict) -> tuple[Any, Any]:
    """LLaVA's start: pretrained vision encoder + pretrained LLM + a fresh projector, ``<image>`` added to the
    vocabulary."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from deco_models import DecoConfig, DecoForConditionalGeneration, DecoProcessor

    margs = config.model
    vision_config = AutoConfig.from_pretrained(margs.vision_name_or_path)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    tokenizer = AutoTokenizer.from_pretrained(margs.llm_name_or_path, use_fast=True)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    llm = AutoModelForCausalLM.from_pretrained(margs.llm_name_or_path, **load_kwargs)
    llm.resize_token_embeddings(len(tokenizer))
    deco_config = DecoConfig(
        vision_config=vision_config,
        text_config=llm.config,
        projector_type=margs.projector,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=margs.vision_feature_layer,
        vision_feature_select_strategy=margs.vision_feature_select_strategy,
    )
    model = DecoForConditionalGeneration(deco_config)
    vision = AutoModel.from_pretrained(margs.vision_name_or_path, config=vision_config, **load_kwargs)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if "dtype" in load_kwargs:
        model.to(load_kwargs["dtype"])
    if Path(margs.vision_name_or_path).is_dir():
        from deco_models.processing import load_image_processor

        image_processor = load_image_processor(margs.vision_name_or_path)  # PIL backend, no torchvision
    else:
        image_processor = AutoImageProcessor.from_pretrained(margs.vision_name_or_path)
    processor = DecoProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              num_image_tokens=deco_config.num_image_tokens,
                              image_aspect=config.data.image_aspect or "pad", chat_template=config.template)
    return model, processor


def resolve_packaged_path(path: str | None) -> str | None:
    """``deco_models/configs/...`` paths work from any directory: when not found as given, they are looked up in the
    installed package (the shipped DeepSpeed/accelerate configs)."""
    if path is None or os.path.exists(path):
        return path
    package_parent = Path(__file__).resolve().parents[2]
    candidate = package_parent / path
    if not Path(path).is_absolute() and candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{path} does not exist (also looked in {package_parent})")


def _report_to(value) -> list[str] | str:
    if value != "auto":
        return value
    from transformers.integrations import is_tensorboard_available

    return ["tensorboard"] if is_tensorboard_available() else "none"


def build_training_arguments(config: TrainConfig, mixed_modalities: bool = False) -> TrainingArguments:
    """``transformers.TrainingArguments`` for ``config`` (``train.training_args`` passes anything else through)."""
    return TrainingArguments(**training_arguments_kwargs(config, mixed_modalities))


def training_arguments_kwargs(config: TrainConfig, mixed_modalities: bool = False) -> dict[str, Any]:
    """The keyword arguments :func:`build_training_arguments` passes to ``TrainingArguments`` (inspectable without
    constructing it, which imports DeepSpeed when ``train.deepspeed`` is set)."""
    t = config.train
    if not t.output_dir:
        raise ValueError("train.output_dir is required")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    find_unused = t.ddp_find_unused_parameters
    if find_unused is None and distributed:
        # A batch of text-only records leaves the projector without gradient; DDP must be told.
        find_unused = mixed_modalities
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        adam_beta2=t.adam_beta2,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        fp16=t.fp16,
        deepspeed=resolve_packaged_path(t.deepspeed),
        report_to=_report_to(t.report_to),
        remove_unused_columns=False,  # the collator builds exactly the model's inputs
        dataloader_num_workers=config.data.num_workers,
        ddp_find_unused_parameters=find_unused,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if t.tf32 is not None:
        kwargs["tf32"] = t.tf32
    if t.fsdp:
        kwargs["fsdp"] = t.fsdp
        kwargs["fsdp_config"] = t.fsdp_config
    if t.gradient_checkpointing:
        # Passed only when on; newer transformers renamed it activation_checkpointing (and warn on the old name).
        name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
            else "gradient_checkpointing"
        kwargs[name] = True
        kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    if distributed and not torch.cuda.is_available():
        # accelerate only sets up multi-process CPU (gloo) training when told the run is on CPU.
        kwargs["use_cpu"] = True
        kwargs["ddp_backend"] = "gloo"
    unknown = set(t.training_args) - set(TrainingArguments.__dataclass_fields__)
    if unknown:
        raise ValueError(f"train.training_args has keys TrainingArguments does not know: {sorted(unknown)}")
    kwargs.update(t.training_args)
    return kwargs


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resolve_resume(resume: bool | str | None, output_dir: str) -> str | None:
    if not resume:
        if ckpt.list_checkpoints(output_dir):
            logger.warning("%s already has checkpoints; starting over (pass resume=True / --resume to continue)",
                           output_dir)
        return None
    if isinstance(resume, str) and resume not in ("true", "latest"):
        if not ckpt.is_complete(resume):
            raise ValueError(f"{resume} is not a complete checkpoint (no {ckpt.MARKER}; killed while saving?)")
        return resume
    found = ckpt.find_resumable_checkpoint(output_dir, quarantine=_is_main_process())
    if found is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch", output_dir)
    return found


def _last_loss(log_history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else None


def train(
    config: TrainConfig | dict | str | os.PathLike,
    *,
    model=None,
    processor=None,
    train_dataset=None,
    resume: bool | str | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train one stage (``config.train.stage``: ``align`` or ``finetune``) with transformers' Trainer.

    ``config`` is a :class:`TrainConfig`, a nested dict, or a YAML path. ``model``/``processor`` (built in Python)
    replace ``config.model``; ``train_dataset`` replaces ``config.data``. ``resume=True`` continues from the newest
    complete checkpoint in ``train.output_dir`` (or from scratch if there is none); a path resumes from that
    checkpoint. Writes to ``train.output_dir``: checkpoints, ``train_log.csv``, the final weights (align:
    ``projector.safetensors`` + LLaVA's ``mm_projector.bin``; finetune: the peft adapter with the projector in
    ``modules_to_save``, and LLaVA's LoRA layout with ``non_lora_trainables.bin`` in ``llava_lora/``), and
    ``train_config.yaml``.

    Example::

        from deco_models.train import train
        result = train({"model": {"name_or_path": "runs/tiny"}, "data": {"data_path": "caps.json",
                        "image_folder": "img"}, "train": {"stage": "align", "output_dir": "runs/align",
                        "max_steps": 20, "per_device_batch_size": 4}})
        print(result.final_loss)
    """
    from transformers import set_seed

    config = _coerce_config(config)
    if not config.train.output_dir:
        raise ValueError("train.output_dir is required")
    output_dir = config.train.output_dir
    set_seed(config.train.seed)  # fresh projector weights and LoRA init are reproducible
    if model is None:
        model, processor = build_model(config)
    elif processor is None and train_dataset is None:
        raise ValueError("pass processor= together with model= (or a ready train_dataset=)")
    if config.model.pretrained_projector:
        load_pretrained_projector(model, config.model.pretrained_projector)
    if train_dataset is None:
        if not config.data.data_path:
            raise ValueError("data.data_path is required (or pass train_dataset=)")
        train_dataset = LlavaConversationDataset(
            config.data.data_path,
            config.data.image_folder,
            processor,
            config.template,
            image_aspect=config.data.image_aspect,
            on_bad_image=config.data.on_bad_image,
            check_images=config.data.check_images,
            max_length=config.data.max_length,
        )
    lengths = getattr(train_dataset, "modality_lengths", None) or []
    mixed = any(x > 0 for x in lengths) and any(x < 0 for x in lengths)
    base_model = model
    model = prepare_model_for_stage(model, config)
    args = build_training_arguments(config, mixed_modalities=mixed)
    resume_from = _resolve_resume(resume, output_dir)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    trainer = DecoTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=LlavaCollator(pad_token_id=pad_id),
        processing_class=processor,
        callbacks=[CSVLoggerCallback(Path(output_dir) / LOG_NAME), *(callbacks or [])],
        projector_lr=config.train.projector_lr,
        group_by_length=config.data.group_by_length,
        save_trainable_only=not config.use_lora and config.train.stage == "align",
    )
    if args.should_save:
        _write_config(config, Path(output_dir) / CONFIG_NAME)
    output = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(output_dir)
    exports = {}
    if args.should_save:
        from rgae.io import normal_file_modes

        with normal_file_modes(output_dir):  # save_pretrained's safetensors files would be owner-only
            exports = _export_llava_layout(trainer.model, config, output_dir)
            if config.train.save_merged:
                exports["merged"] = _save_merged(trainer.model, processor, Path(output_dir) / "merged")
    trainer.accelerator.wait_for_everyone()
    skipped = dict(getattr(train_dataset, "bad_images", {}) or {})
    if skipped:
        logger.warning("%d record(s) were skipped for bad images, e.g. %s", len(skipped), list(skipped.items())[:5])
    del base_model
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        final_loss=_last_loss(trainer.state.log_history),
        log_csv=str(Path(output_dir) / LOG_NAME),
        model=trainer.model,
        processor=processor,
        trainer=trainer,
        metrics=dict(output.metrics),
        skipped_images=skipped,
        exports=exports,
        resumed_from=resume_from,
    )


def _write_config(config: TrainConfig, path: Path) -> None:
    import yaml

    from deco_models.io import atomic_write

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _export_llava_layout(model, config: TrainConfig, output_dir: str) -> dict[str, str]:
    """LLaVA's file layout beside ours: ``mm_projector.bin`` (align) / ``llava_lora/`` with
    ``non_lora_trainables.bin`` (finetune)."""
    exports = {}
    try:
        from deco_models import convert
    except ImportError:
        logger.warning("deco_models.convert is not available: LLaVA-layout exports skipped")
        return exports
    if config.use_lora and hasattr(convert, "export_llava_lora"):
        # A subfolder: the LLaVA layout has its own adapter_model/config files that must not replace ours.
        llava_dir = Path(output_dir) / "llava_lora"
        convert.export_llava_lora(model, llava_dir)
        exports["llava_lora"] = str(llava_dir)
        exports["non_lora_trainables"] = str(llava_dir / "non_lora_trainables.bin")
    elif not config.use_lora and hasattr(convert, "export_mm_projector"):
        path = Path(output_dir) / "mm_projector.bin"
        convert.export_mm_projector(model, path)
        exports["mm_projector"] = str(path)
    return exports


def _save_merged(model, processor, out_dir: Path) -> str:
    """A standalone model (LoRA merged into the LLM, trained projector in place) loadable with ``deco_models.load``."""
    import copy

    standalone = model
    if hasattr(model, "merge_and_unload"):
        standalone = copy.deepcopy(model).merge_and_unload()
    standalone.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return str(out_dir)


def load_log(output_dir: str | os.PathLike) -> dict[str, list[float]]:
    """The CSV training log of a run (see :func:`deco_models.train.callbacks.read_log`)."""
    from deco_models.train.callbacks import read_log

    return read_log(Path(output_dir) / LOG_NAME)


def summarize(result: TrainResult) -> str:
    """One line for command-line output."""
    loss = "n/a" if result.final_loss is None or math.isnan(result.final_loss) else f"{result.final_loss:.4f}"
    return json.dumps({"output_dir": result.output_dir, "step": result.global_step, "final_loss": loss,
                       "skipped_images": len(result.skipped_images), **result.exports})

"""What trains in each stage: freezing, LoRA wrapping (peft), and loading an aligned projector.

- ``align``: only the projector trains (LLaVA's ``tune_mm_mlp_adapter``).
- ``finetune`` with LoRA (default): LoRA adapters on every linear layer of the LLM plus the whole projector, which
  peft keeps as a trainable copy in ``modules_to_save`` so it is saved inside the adapter.
- ``finetune`` without LoRA (``lora.enable: false``): projector + the whole LLM.
The vision tower stays frozen unless ``train.freeze_vision`` is false.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from deco_models.train.config import TrainConfig

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"
LANGUAGE = "language_model"
TRAINABLE_NAME = "trainable.safetensors"  # align checkpoints: only the trained tensors, keyed like model.state_dict()
PROJECTOR_NAME = "projector.safetensors"  # the projector's own state dict (keys relative to the projector)


def find_module_name(model: nn.Module, suffix: str) -> str:
    """Qualified name of the (outermost) submodule whose name ends with ``suffix``."""
    names = [name for name, _ in model.named_modules() if name == suffix or name.endswith("." + suffix)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no submodule named {suffix!r}; is it a Llava/deco model?")
    return min(names, key=len)


def get_projector(model: nn.Module) -> nn.Module:
    return model.get_submodule(find_module_name(model, PROJECTOR))


def language_linear_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the language model (LLaVA's ``find_all_linear_names`` without projector, vision
    tower and ``lm_head``): the LoRA targets."""
    prefix = find_module_name(model, LANGUAGE) + "."
    return [name for name, module in model.named_modules() if name.startswith(prefix) and isinstance(module, nn.Linear)]


def is_projector_parameter(name: str) -> bool:
    return f"{PROJECTOR}." in name or name.startswith(PROJECTOR)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def prepare_model_for_stage(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze/unfreeze and (for LoRA) wrap ``model`` with peft; returns the model to train.

    >>> from deco_models.train.config import TrainConfig  # doctest: +SKIP
    >>> model = prepare_model_for_stage(model, TrainConfig.from_dict({"train": {"stage": "align"}}))  # doctest: +SKIP
    """
    stage = config.train.stage
    model.requires_grad_(False)
    projector = get_projector(model)
    if config.use_lora:
        from peft import LoraConfig

        from deco_models.peft_compat import get_peft_model

        targets = config.lora.target_modules or language_linear_names(model)
        if not targets:
            raise ValueError("no linear layers found in the language model for LoRA")
        lora_config = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=targets,
            modules_to_save=[PROJECTOR],
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        if config.lora.full_train:
            train_in_full(model, config.lora.full_train)
        if not config.train.freeze_vision:
            # After wrapping: peft freezes everything that is not an adapter or in modules_to_save.
            get_submodule_by_suffix(model, VISION).requires_grad_(True)
        if config.train.gradient_checkpointing:
            # Frozen embeddings produce no grad: without this, checkpointed blocks would get no gradient at all.
            model.enable_input_require_grads()
    else:
        projector.requires_grad_(True)
        if stage == "finetune":
            get_submodule_by_suffix(model, LANGUAGE).requires_grad_(True)
            lm_head = getattr(model, "lm_head", None)
            if lm_head is not None:
                lm_head.requires_grad_(True)
        if not config.train.freeze_vision:
            get_submodule_by_suffix(model, VISION).requires_grad_(True)
        if config.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    logger.info("stage %s: %s of %s parameters train (%.2f%%)", stage, f"{trainable:,}", f"{total:,}",
                100.0 * trainable / max(total, 1))
    return model


def train_in_full(model: nn.Module, patterns: list[str]) -> list[str]:
    """Unfreeze the language model's (and ``lm_head``'s) parameters whose dotted name has a component containing one
    of ``patterns``; returns their names. Raises if a pattern matches nothing, so a typo cannot silently train less.

    Example: ``train_in_full(peft_model, ["norm", "embed_tokens", "lm_head"])`` trains every RMSNorm, the input
    embeddings and the output head in full beside the LoRA adapters.
    """
    language = find_module_name(model, LANGUAGE) + "."
    unused, names = set(patterns), []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if not (name.startswith(language) or "lm_head" in parts) or "lora_" in name:
            continue
        hit = [p for p in patterns if any(p in part for part in parts)]
        if hit:
            param.requires_grad_(True)
            names.append(name)
            unused.difference_update(hit)
    if unused:
        raise ValueError(f"lora.full_train patterns {sorted(unused)} match no language-model parameter")
    return names


def get_submodule_by_suffix(model: nn.Module, suffix: str) -> nn.Module:
    return model.get_submodule(find_module_name(model, suffix))


def save_projector(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the projector's own state dict (keys relative to the projector) as safetensors, atomically."""
    from safetensors.torch import save_file

    from deco_models.io import atomic_write

    projector = _trained_projector(model)
    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _trained_projector(model: nn.Module) -> nn.Module:
    projector = get_projector(model)
    # Inside a peft model the projector is a ModulesToSaveWrapper: the trained copy is modules_to_save[adapter].
    copies = getattr(projector, "modules_to_save", None)
    if copies is not None and len(copies):
        adapter = getattr(projector, "active_adapter", None)
        adapter = adapter[0] if isinstance(adapter, list) else adapter
        return copies[adapter] if adapter in copies else next(iter(copies.values()))
    return projector


def load_pretrained_projector(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an aligned projector into ``model``: a folder written by the align stage, its ``projector.safetensors``,
    or LLaVA's ``mm_projector.bin`` (through :mod:`deco_models.convert`)."""
    from deco_models.io import load_state_dict

    path = Path(path)
    if path.is_dir():
        for name in (PROJECTOR_NAME, "mm_projector.bin", "mm_projector.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} has no {PROJECTOR_NAME} or mm_projector.bin")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained projector {path} does not exist")
    projector = get_projector(model)
    if path.name == PROJECTOR_NAME:
        state = load_state_dict(path)
    else:
        state = _llava_projector_state(model, path)
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model's projector ({getattr(model.config, 'projector_type', '?')}): "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    logger.info("loaded pretrained projector from %s", path)


def _llava_projector_state(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Projector state dict from LLaVA's ``mm_projector.bin`` layout (``model.mm_projector.0.weight``, ...)."""
    from deco_models.convert import projector_state_from_llava
    from deco_models.io import load_state_dict

    raw = load_state_dict(path)
    inner = {k.split("mm_projector.", 1)[1]: v for k, v in raw.items() if "mm_projector." in k}
    if not inner:
        raise ValueError(f"{path} has no 'mm_projector.*' tensors (keys: {sorted(raw)[:5]})")
    return projector_state_from_llava(inner, model.config.projector_type)

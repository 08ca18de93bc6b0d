"""Training for deco_models on transformers' Trainer: the paper's two-stage LLaVA recipe (projector alignment, then
LoRA instruction tuning) or the one-stage PRISM setting, on one CPU or many GPUs.

>>> from deco_models.train import TrainConfig
>>> TrainConfig.from_dict({"train": {"stage": "finetune", "output_dir": "out"}}).use_lora
True

Main entry points: :func:`train` (Python), ``deco train --config X.yaml`` (CLI), :func:`plot_curves` (Figure 5-style
loss curves of several runs), :data:`deco_models.train.recipes.RECIPES` (named recipes for ``deco train --recipe``).
"""

from __future__ import annotations

from deco_models.train.config import DataArgs, LoraArgs, ModelArgs, OptimArgs, TrainConfig, parse_overrides

_LAZY = {
    "train": "deco_models.train.trainer",
    "TrainResult": "deco_models.train.trainer",
    "DecoTrainer": "deco_models.train.trainer",
    "build_model": "deco_models.train.trainer",
    "build_training_arguments": "deco_models.train.trainer",
    "load_log": "deco_models.train.trainer",
    "plot_curves": "deco_models.train.curves",
    "CSVLoggerCallback": "deco_models.train.callbacks",
    "read_log": "deco_models.train.callbacks",
    "prepare_model_for_stage": "deco_models.train.stages",
    "load_pretrained_projector": "deco_models.train.stages",
    "find_resumable_checkpoint": "deco_models.train.checkpoints",
    "RECIPES": "deco_models.train.recipes",
    "register_recipe": "deco_models.train.recipes",
}

__all__ = ["DataArgs", "LoraArgs", "ModelArgs", "OptimArgs", "TrainConfig", "parse_overrides", *_LAZY]


def __getattr__(name):
    # Lazy: importing transformers' Trainer costs seconds; `deco --help` should not pay it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deco_models.train' has no attribute {name!r}")

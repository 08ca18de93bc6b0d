"""The ``deco`` command line's plumbing: the general runner of :mod:`rgae.cli_base` plus the deco-specific check
that a ``--model`` names something :func:`deco_models.load` can load (run before the model is loaded)."""

from __future__ import annotations

from rgae.cli_base import UsageError, build_parser, run

# What a model folder needs, in the words of a one-line error (deco_models.loading.LAYOUTS has the full list).
MODEL_FOLDER_HELP = (
    "a model folder must contain config.json and the weights (model.safetensors, pytorch_model.bin or shards), "
    "or be a LLaVA LoRA folder (adapter_config.json, adapter_model.*, non_lora_trainables.*) or hold a stage-1 "
    "mm_projector.bin"
)


def zoo_names_text() -> str:
    from deco_models import zoo

    names = zoo.available()
    return f"zoo models: {', '.join(names)}" if names else "no zoo models are installed"


def check_model(name: str, option: str = "--model") -> str:
    """The layout of the model ``name`` (a zoo name, a folder or a projector file; see
    :func:`deco_models.loading.detect_layout`); :class:`UsageError` listing the zoo and what a folder must contain.

    Example:
        >>> check_model("shapes-mini-avgpool2_36")
        'zoo'
    """
    from deco_models.loading import detect_layout

    try:
        return detect_layout(name)
    except ValueError as exc:
        reason = str(exc).split(" Supported layouts:")[0]
        raise UsageError(f"{option} {name}: {reason} ({zoo_names_text()}; {MODEL_FOLDER_HELP})") from None


__all__ = ["MODEL_FOLDER_HELP", "UsageError", "build_parser", "check_model", "run", "zoo_names_text"]

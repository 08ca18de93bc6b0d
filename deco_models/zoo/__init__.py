"""The shipped model zoo: tiny deco models trained on the shapes world, usable offline.

Layout (inside the installed package)::

    zoo/shapes-mini/base/vision/        CLIPVisionModel (config.json, model.safetensors), frozen in every model
    zoo/shapes-mini/base/llm/           LlamaForCausalLM + the word-level tokenizer
    zoo/shapes-mini/base/preprocessor_config.json
    zoo/shapes-mini/<projector>/        one model in LLaVA's published LoRA layout: config.json (LLaVA,
                                        mm_vision_tower -> ../base/vision), adapter_config.json +
                                        adapter_model.safetensors (LoRA on the LLM), non_lora_trainables.safetensors
                                        (the projector and the LLM tensors trained in full: norms, embeddings,
                                        head), metrics.json (held-out quality measured after training)

A model's name is ``shapes-mini-<projector>`` (``shapes-mini-mlp2x_gelu``, ``shapes-mini-avgpool2_36``, ...).

Example:
    >>> from deco_models import zoo
    >>> names = zoo.available()
    >>> all(n.startswith("shapes-mini-") for n in names)
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
FAMILIES = {"shapes-mini": ZOO_DIR / "shapes-mini"}
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ZooEntry:
    """Where a zoo model lives: ``path`` (its adapter folder), ``base`` (the shared base folder), ``projector``."""

    name: str
    path: Path
    base: Path
    projector: str

    @property
    def metrics(self) -> dict:
        """Held-out numbers recorded when the model was trained (empty if none were recorded)."""
        file = self.path / "metrics.json"
        return json.loads(file.read_text()) if file.is_file() else {}


def _entries() -> dict[str, ZooEntry]:
    found = {}
    for family, root in FAMILIES.items():
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if child.is_dir() and (child / ADAPTER_CONFIG).is_file():
                name = f"{family}-{child.name}"
                found[name] = ZooEntry(name=name, path=child, base=root / "base", projector=child.name)
    return found


def available() -> list[str]:
    """Names of the shipped models, sorted.

    Example:
        >>> "shapes-mini-avgpool2_36" in available()  # doctest: +SKIP
        True
    """
    return sorted(_entries())


def is_zoo_name(name) -> bool:
    """True for a name of a shipped model (a cheap check for ``deco_models.load``)."""
    return isinstance(name, str) and name in _entries()


def resolve(name: str) -> ZooEntry:
    """The :class:`ZooEntry` of a shipped model; ``ValueError`` naming the available ones otherwise.

    Example:
        >>> resolve("shapes-mini-avgpool2_36").projector  # doctest: +SKIP
        'avgpool2_36'
    """
    entries = _entries()
    if name not in entries:
        raise ValueError(f"unknown zoo model {name!r}; available: {sorted(entries) or 'none (zoo not installed)'}")
    return entries[name]


def load(name: str, attn_implementation: str | None = "eager"):
    """Load a shipped model offline: ``(model, processor)`` in eval mode, LoRA merged.

    The model folder is LLaVA's published LoRA layout; it is loaded by :func:`deco_models.load` over the shared base
    (LLM + tokenizer from ``base/llm``, vision tower from ``base/vision``). Eager attention by default, the kernel
    the shipped metrics were measured with; the explainers work with any (``attn_implementation="sdpa"``).

    Example:
        >>> model, processor = load("shapes-mini-avgpool2_36")  # doctest: +SKIP
        >>> model.config.num_image_tokens  # doctest: +SKIP
        36
    """
    from deco_models.loading import load as load_model
    from rgae.verbosity import quiet_loading

    entry = resolve(name)
    with quiet_loading():  # three from_pretrained calls: three "Loading weights" bars otherwise
        return load_model(str(entry.path), base=str(entry.base / "llm"), vision_tower=str(entry.base / "vision"),
                          attn_implementation=attn_implementation)


__all__ = ["ZooEntry", "available", "is_zoo_name", "load", "resolve", "ZOO_DIR"]

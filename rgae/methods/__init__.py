"""Explainers, captum-style: ``Method(model, processor).attribute(image, target=None, prompt=None, **options)``
returns an :class:`~rgae.explanation.Explanation`.

Example:
    >>> from rgae.methods import RGAE
    >>> RGAE(model, processor).attribute("photo.jpg", target="A pot of green plants")  # doctest: +SKIP
"""

from __future__ import annotations

from rgae.methods.base import Explainer, load_image
from rgae.methods.rgae import RGAE

__all__ = ["RGAE", "AttentionRollout", "Explainer", "GradCAM", "Occlusion", "RawAttention", "load_image"]

_LAZY = {
    "RawAttention": "rgae.methods.rawattn",
    "AttentionRollout": "rgae.methods.rollout",
    "GradCAM": "rgae.methods.gradcam",
    "Occlusion": "rgae.methods.occlusion",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rgae.methods' has no attribute {name!r}")

"""Tiny "planted" models of several families, one builder each, for figures that compare the families
(``examples/family_comparison.py``, ``tests/test_family_comparison.py``).

Every model is the family's tiny random model (``tests/families/tiny_*.py``) with its real processor (mean 0 / std 1)
and :func:`tests.families.block_checks.plant` applied: the vision tower's residual branches, position embeddings and
biases are zero and its patch embedding ignores the blue channel, so a pure-blue patch gives exactly zero features
(:func:`planted_image`: a blue image with one white square). Only the square's tokens then carry value vectors into
the LLM (one layer), and every family's explanation of any caption should light up the square.

Example:
    >>> sorted(PLANTED)[:3]
    ['blip2', 'gemma3', 'idefics3']
"""

from __future__ import annotations

import torch

from tests.families.block_checks import plant, planted_image
from tests.families.layout_probes import patch_embedding_conv

__all__ = ["PLANTED", "planted_family", "planted_image"]

#: Mean 0 / std 1: the processor leaves pixel values in [0, 1], so blue is (0, 0, 1) and its embedding is zero.
_UNIT = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}


def _llava_next():
    from tests.families.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor

    return tiny_llava_next(text_layers=1, seed=1), tiny_llava_next_processor(**_UNIT)


def _llava_onevision():
    from tests.families.tiny_llava_onevision import tiny_llava_onevision, tiny_llava_onevision_processor

    return tiny_llava_onevision(text_layers=1), tiny_llava_onevision_processor(**_UNIT)


def _gemma3():
    from tests.families.tiny_gemma3 import tiny_gemma3, tiny_gemma3_processor

    return tiny_gemma3(text_layers=1), tiny_gemma3_processor(**_UNIT)


def _internvl():
    from tests.families.tiny_internvl import tiny_internvl

    return tiny_internvl(dtype=torch.float32, text_layers=1, processor_kwargs=_UNIT)


def _idefics3():
    from tests.families.tiny_idefics3 import tiny_idefics3

    return tiny_idefics3(dtype=torch.float32, text_layers=1, processor_kwargs=_UNIT)


def _mistral3():
    from tests.families.tiny_mistral3 import tiny_mistral3

    return tiny_mistral3(dtype=torch.float32, text_layers=1, processor_kwargs=_UNIT)


def _blip2():
    from tests.families.tiny_blip2 import tiny_blip2

    return tiny_blip2(dtype=torch.float32, **_UNIT)


#: Family name → builder of its unplanted ``(model, processor)``, in the order of the comparison figure.
_BUILDERS = {
    "llava-next": _llava_next,
    "llava-onevision": _llava_onevision,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "idefics3": _idefics3,
    "mistral3": _mistral3,
    "blip2": _blip2,
}
PLANTED = tuple(_BUILDERS)


def planted_family(name: str):
    """``(model, processor)`` of family ``name`` (one of :data:`PLANTED`), planted (module docs)."""
    from rgae.adapters import get_adapter

    if name not in _BUILDERS:
        raise ValueError(f"no planted builder for {name!r}; known: {', '.join(PLANTED)}")
    model, processor = _BUILDERS[name]()
    adapter = get_adapter(model)
    plant(model, adapter.vision_tower, adapter.projector, adapter.language_model,
          patch_embedding_conv(adapter.vision_tower))
    return model, processor

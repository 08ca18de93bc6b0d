"""DecoForConditionalGeneration: transformers' Llava with the projector built from the config's spec string.

Everything except the projector is stock Llava (vision tower, feature layer/CLS selection, image-token scatter,
LLM, generation, save/load): the override is only the construction of ``multi_modal_projector``. The projector maps
``[num_images, N, Dv]`` patches to ``[num_images, M, Dl]``; the LLM sees exactly M image tokens per image.

Example:
    >>> import torch
    >>> from tests.tiny import tiny_deco_config  # doctest: +SKIP
    >>> model = DecoForConditionalGeneration(tiny_deco_config(projector="avgpool2_4"))  # doctest: +SKIP
    >>> model.multi_modal_projector.num_queries  # doctest: +SKIP
    4
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from deco_models.configuration import DecoConfig


def build_model_projector(config: DecoConfig) -> nn.Module:
    """The projector module a deco model with ``config`` uses (also used by the converters)."""
    from deco_models.projectors import build_projector

    kwargs = dict(config.projector_kwargs or {})
    if not config.multimodal_projector_bias:
        kwargs.setdefault("bias", False)
    return build_projector(
        config.projector_type,
        vision_hidden_size=config.projector_input_size,
        llm_hidden_size=config.text_config.hidden_size,
        grid_hw=config.patch_grid,
        **kwargs,
    )


def _keep_own_init(module: nn.Module) -> None:
    """Mark a freshly built projector as initialized so post_init's generic ``_init_weights`` (normal(0, 0.02) for
    every Linear) keeps the family's own initialization (Q-Former queries, D-Abstractor offsets, ...).

    Under ``from_pretrained`` the model is built on the meta device: nothing is marked there, so tensors missing
    from a checkpoint still get transformers' initialization instead of staying empty."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        return
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in tensors:
        tensor._is_hf_initialized = True


class DecoPreTrainedModel(LlavaPreTrainedModel):
    config: DecoConfig
    config_class = DecoConfig


class DecoModel(DecoPreTrainedModel, LlavaModel):
    """LlavaModel whose ``multi_modal_projector`` is the config's projector."""

    def __init__(self, config: DecoConfig):
        # Not LlavaModel.__init__: it would allocate a full-size LlavaMultiModalProjector only to throw it away.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_model_projector(config)
        _keep_own_init(self.multi_modal_projector)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class DecoForConditionalGeneration(DecoPreTrainedModel, LlavaForConditionalGeneration):
    """Llava for generation with any projector of the zoo (see :mod:`deco_models.projectors`).

    ``model.multi_modal_projector`` is the projector (with ``num_queries``, ``kind``, ``grid_hw``, ``query_grid``,
    ``spec``); ``model.config.num_image_tokens`` is M.
    """

    def __init__(self, config: DecoConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DecoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # Attribute shortcuts (LlavaForConditionalGeneration in 5.x only exposes these through ``self.model``).
    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model


AutoModel.register(DecoConfig, DecoModel, exist_ok=True)
AutoModelForImageTextToText.register(DecoConfig, DecoForConditionalGeneration, exist_ok=True)

__all__ = ["DecoConfig", "DecoForConditionalGeneration", "DecoModel", "DecoPreTrainedModel", "build_model_projector"]

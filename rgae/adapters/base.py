"""What an explainer needs to know about a model family, and nothing about the math.

An adapter answers: which modules are the attention layers of the LLM, the projector and the vision encoder (matched by
class, in forward order), where the image tokens sit in ``input_ids``, the patch grid and query grid, how many non-patch
tokens (CLS) the vision sequence and the projector input carry, which projector kind decides the Query-to-Patch rule,
and which module is the projector (its input are the patch features at ``vision_feature_layer``).

All geometry is read from the model's config and modules; there are no size constants here.

Example:
    >>> from rgae.adapters import get_adapter
    >>> adapter = get_adapter(model)  # doctest: +SKIP
    >>> adapter.patch_grid, adapter.query_grid, adapter.projector_kind  # doctest: +SKIP
    ((4, 4), (4, 4), 'mlp')
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Projector kinds and the Query-to-Patch rule each one gets (see rgae.methods.rgae).
PROJECTOR_KINDS = ("linear", "mlp", "avgpool", "maxpool", "qformer", "cabstractor", "dabstractor")


def _as_hw(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def leaf_attention_modules(root: nn.Module, class_names: tuple[str, ...] | None = None) -> list[nn.Module]:
    """Attention modules under ``root``, in registration order.

    With ``class_names``, modules whose class name is in the tuple; otherwise every module whose class name ends in
    ``Attention`` and that contains no other such module (so ``Blip2QFormerAttention`` wrappers are skipped in favour of
    the inner module that computes the probabilities). ``torch.nn.MultiheadAttention`` (SigLIP's pooling head) is
    not a transformer layer over the patch tokens and is skipped.
    """
    if class_names is not None:
        return [m for m in root.modules() if type(m).__name__ in class_names]
    # torch's nn.MultiheadAttention is SigLIP's pooling head (after the encoder, not a patch-token layer).
    found = [
        m for m in root.modules() if type(m).__name__.endswith("Attention") and not isinstance(m, nn.MultiheadAttention)
    ]
    inner = []
    for m in found:
        children = [c for c in m.modules() if c is not m and type(c).__name__.endswith("Attention")]
        if not children:
            inner.append(m)
    return inner


@dataclass
class ModelAdapter:
    """Declarative description of one LLaVA-style model (vision encoder -> projector -> LLM).

    Attributes:
        model: the model (a ``LlavaForConditionalGeneration`` or subclass).
        language_model, vision_tower, projector: its three parts.
        llm_attention: LLM self-attention modules in forward order.
        vision_attention: vision encoder self-attention modules in forward order (all layers; the ones after
            ``vision_feature_layer`` get no gradient and are skipped).
        projector_attention: ``[("self"|"cross", module)]`` of an attention projector (Q-Former), forward order.
        projector_kind: one of :data:`PROJECTOR_KINDS`.
        patch_grid: ``(h, w)`` of the vision patches; query_grid: ``(h, w)`` of the projector queries (None when the
            queries are not a grid, e.g. a CLS query in front).
        vision_prefix: non-patch tokens in front of the vision sequence (1 for CLIP's CLS, 0 for SigLIP).
        feature_prefix: non-patch tokens in front of the projector input (CLS kept by ``vision_feature_select_strategy
            == "full"``).
        vision_feature_layer: the hidden-state index whose features feed the projector.
        image_token_id: the placeholder id of image tokens in ``input_ids``.
        projector_type: the spec string (``mlp2x_gelu``, ``avgpool2_144``, ...), for the record.
    """

    model: nn.Module
    language_model: nn.Module
    vision_tower: nn.Module
    projector: nn.Module
    llm_attention: list[nn.Module]
    vision_attention: list[nn.Module]
    projector_kind: str
    patch_grid: tuple[int, int]
    query_grid: tuple[int, int] | None
    image_token_id: int
    vision_feature_layer: int
    vision_prefix: int = 0
    feature_prefix: int = 0
    projector_attention: list[tuple[str, nn.Module]] = field(default_factory=list)
    projector_type: str | None = None

    def __post_init__(self):
        if self.projector_kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector_kind must be one of {PROJECTOR_KINDS}, got {self.projector_kind!r}")
        if not self.llm_attention:
            raise ValueError(f"no LLM attention modules found in {type(self.language_model).__name__}")
        self.patch_grid = _as_hw(self.patch_grid)
        if self.query_grid is not None:
            self.query_grid = _as_hw(self.query_grid)
        elif not self.is_identity:
            raise ValueError(f"a {self.projector_kind!r} projector needs a query_grid")

    # ---- geometry --------------------------------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def n_queries(self) -> int:
        """M: image tokens the LLM sees."""
        if self.is_identity:
            return self.n_features
        return self.query_grid[0] * self.query_grid[1]

    @property
    def is_identity(self) -> bool:
        return self.projector_kind in ("linear", "mlp")

    @property
    def n_features(self) -> int:
        """Tokens in the projector input: patches plus the kept prefix."""
        return self.n_patches + self.feature_prefix

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[M]`` sequence positions of the image tokens in ``input_ids [1, S]``."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (one example), got {tuple(input_ids.shape)}")
        pos = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if pos.numel() != self.n_queries:
            raise ValueError(
                f"expected {self.n_queries} image tokens (id {self.image_token_id}) in input_ids, found {pos.numel()}; "
                "was the prompt built by the model's processor?"
            )
        return pos

    @property
    def num_vision_layers_used(self) -> int:
        """Vision encoder layers up to ``vision_feature_layer`` (hidden_states[k] is the output of layer k)."""
        n = len(self.vision_attention)
        k = self.vision_feature_layer
        return k if k >= 0 else n + 1 + k

    @property
    def max_positions(self) -> int | None:
        cfg = getattr(self.model.config, "text_config", self.model.config)
        return getattr(cfg, "max_position_embeddings", None)

    def describe(self) -> dict:
        return {
            "projector_kind": self.projector_kind,
            "projector_type": self.projector_type,
            "patch_grid": list(self.patch_grid),
            "query_grid": None if self.query_grid is None else list(self.query_grid),
            "llm_layers": len(self.llm_attention),
            "vision_layers": len(self.vision_attention),
            "projector_attention_layers": len(self.projector_attention),
            "vision_prefix": self.vision_prefix,
            "feature_prefix": self.feature_prefix,
        }

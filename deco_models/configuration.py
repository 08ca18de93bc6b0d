"""DecoConfig: a LlavaConfig that names its projector by the DeCo paper's spec string.

A deco model is a LLaVA model (vision tower -> projector -> LLM) whose projector is built by
:func:`deco_models.projectors.build_projector` from ``projector_type`` (``mlp2x_gelu``, ``avgpool2_144``, ...).
``mlp2x_gelu`` has exactly llava-hf's projector keys, so a stock llava-hf checkpoint *is* an ``mlp2x_gelu`` deco model.

Example:
    >>> from transformers import CLIPVisionConfig, LlamaConfig
    >>> from deco_models.configuration import DecoConfig
    >>> cfg = DecoConfig(
    ...     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                    num_attention_heads=2, image_size=48, patch_size=8),
    ...     text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                             num_attention_heads=2, num_key_value_heads=2, vocab_size=100),
    ...     projector_type="avgpool2_9", image_token_index=99)
    >>> cfg.patch_grid, cfg.num_image_tokens, cfg.vision_feature_select_strategy
    ((6, 6), 9, 'default')
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaConfig

# Vision backbones whose hidden states start with a CLS token: LLaVA's "default" strategy drops it.
# Backbones listed as 0 have no CLS token and must use "full" (dropping token 0 would drop a real patch).
_PREFIX_TOKENS = {
    "clip_vision_model": 1,
    "metaclip_2_vision_model": 1,
    "vit": 1,
    "dinov2": 1,
    "siglip_vision_model": 0,
}


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"vision_config.{name} must be an int or an (h, w) pair of ints, got {value!r}")


def vision_patch_grid(vision_config) -> tuple[int, int]:
    """(h, w) patch grid of a transformers vision config: image_size / patch_size per axis (tuples allowed).

    Example:
        >>> from transformers import ViTConfig
        >>> vision_patch_grid(ViTConfig(image_size=(64, 96), patch_size=16))
        (4, 6)
    """
    for name in ("image_size", "patch_size"):
        if getattr(vision_config, name, None) is None:
            raise ValueError(
                f"vision config {type(vision_config).__name__} has no {name!r}; deco models need a patch-based "
                "vision backbone whose config gives image_size and patch_size (CLIP, SigLIP, ViT, ...)"
            )
    ih, iw = _pair(vision_config.image_size, "image_size")
    ph, pw = _pair(vision_config.patch_size, "patch_size")
    if ih % ph or iw % pw:
        raise ValueError(
            f"vision_config.image_size {(ih, iw)} is not a multiple of patch_size {(ph, pw)}: the patch grid would "
            "drop border pixels"
        )
    return (ih // ph, iw // pw)


def vision_prefix_tokens(vision_config) -> int | None:
    """Number of non-patch tokens (CLS) at the start of the backbone's hidden states; None if unknown."""
    return _PREFIX_TOKENS.get(getattr(vision_config, "model_type", None))


@strict
class DecoConfig(LlavaConfig):
    r"""Configuration of a :class:`~deco_models.modeling.DecoForConditionalGeneration`.

    Args (on top of :class:`transformers.LlavaConfig`):
        projector_type: the projector spec string (``linear``, ``mlp{N}x_gelu``, ``avgpool{L}_{M}``,
            ``maxpool{L}_{M}``, ``qformer{L}_{M}``, ``cabstractor_{M}``, ``dabstractor_{M}``).
        projector_kwargs: extra keyword options for the projector family's constructor (e.g. Q-Former ``width``).
        vision_feature_select_strategy: ``"default"`` drops the CLS token, ``"full"`` keeps every token. ``None``
            (the default) picks it from the backbone: CLIP/ViT have a CLS token ("default"), SigLIP has none ("full").
        image_token_index (alias ``image_token_id``): the id of the image placeholder token.

    ``image_seq_length`` is set to :attr:`num_image_tokens` (M), which is what the LLM sees per image.
    """

    model_type = "deco"

    projector_type: str = "mlp2x_gelu"
    projector_kwargs: dict | None = None
    vision_feature_select_strategy: Literal["default", "full"] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_kwargs is None:
            self.projector_kwargs = {}
        prefix = vision_prefix_tokens(self.vision_config)
        vision_type = getattr(self.vision_config, "model_type", None)
        if self.vision_feature_select_strategy is None:
            if prefix is None:
                raise ValueError(
                    f"unknown vision backbone {vision_type!r}: pass vision_feature_select_strategy='default' if its "
                    "hidden states start with one CLS token, 'full' if they are patches only"
                )
            self.vision_feature_select_strategy = "default" if prefix == 1 else "full"
        elif self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' (drop CLS) or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if prefix == 0 and self.vision_feature_select_strategy == "default":
            raise ValueError(
                f"vision backbone {vision_type!r} has no CLS token; 'default' would drop a real patch. "
                "Use vision_feature_select_strategy='full'"
            )
        if prefix == 1 and self.vision_feature_select_strategy == "full":
            raise ValueError(
                f"vision backbone {vision_type!r} starts with a CLS token; 'full' would feed it to the projector as a "
                "patch and break the patch grid. Use vision_feature_select_strategy='default'"
            )
        # Validates the spec against the grid now (clear ValueError) rather than at model construction.
        from deco_models.projectors import parse_projector_spec

        grid = self.patch_grid
        parse_projector_spec(self.projector_type, num_patches=grid[0] * grid[1])
        self.image_seq_length = self.num_image_tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(h, w) patch grid from the vision config (rectangular grids allowed; never int(sqrt(n)))."""
        return vision_patch_grid(self.vision_config)

    @property
    def num_image_tokens(self) -> int:
        """M: image tokens the LLM sees per image (the projector's output length)."""
        from deco_models.projectors import parse_projector_spec

        grid = self.patch_grid
        parsed = parse_projector_spec(self.projector_type, num_patches=grid[0] * grid[1])
        return parsed.num_queries if parsed.num_queries is not None else grid[0] * grid[1]

    @property
    def projector_input_size(self) -> int:
        """Width of the features the projector receives (vision hidden size x number of selected layers)."""
        layers = self.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        return self.vision_config.hidden_size * n


AutoConfig.register("deco", DecoConfig, exist_ok=True)

__all__ = ["DecoConfig", "vision_patch_grid", "vision_prefix_tokens"]

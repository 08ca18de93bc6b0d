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

from rgae.layout import ImageLayout, View

#: Projector kinds and the Query-to-Patch rule each one gets (see rgae.methods.rgae).
PROJECTOR_KINDS = ("linear", "mlp", "avgpool", "maxpool", "qformer", "cabstractor", "dabstractor")
# connector_patch_rows: a row of the connector's input that belongs to another image of the prompt (Qwen-VL packs every
# image into one sequence); unlike -1 (a row of this image that is no patch, e.g. CLS) it enters nothing of this map.
OTHER_IMAGE_ROW = -2


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
        llm_attention_kinds: ``"self"`` or ``"cross"`` for each of ``llm_attention``; None: all self-attention. An
            LLM with cross-attention layers (Mllama) reads the image through them as their keys, not as tokens of
            its sequence; the layout's ``positions`` then index those keys.
        projector_input: the keyword argument carrying the patch features into a projector that is called with
            keywords only (BLIP-2's Q-Former: ``"encoder_hidden_states"``); None: its first positional argument.
        prompt_template: how the family wraps an instruction when its processor has no chat template, with
            ``{image}`` and ``{instruction}`` fields (PaliGemma: ``"{image}{instruction}"``, its processor adds the
            rest); None: LLaVA's plain ``USER: {image}\n{instruction} ASSISTANT:``.
        target_token_values: the value per-token model inputs (processor outputs shaped like ``input_ids``) take
            over the target text, by input name; 0 (text) for the others. PaliGemma's ``token_type_ids`` mark the
            target as the causal suffix: ``{"token_type_ids": 1}``.
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
    llm_attention_kinds: tuple[str, ...] | None = None
    projector_input: str | None = None
    prompt_template: str | None = None
    target_token_values: dict[str, int] = field(default_factory=dict)

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
        if self.llm_attention_kinds is not None:
            self.llm_attention_kinds = tuple(self.llm_attention_kinds)
            if len(self.llm_attention_kinds) != len(self.llm_attention) or not set(self.llm_attention_kinds) <= {
                    "self", "cross"}:
                raise ValueError(
                    f"llm_attention_kinds must give 'self' or 'cross' for each of the {len(self.llm_attention)} LLM "
                    f"attention modules, got {self.llm_attention_kinds!r}"
                )

    @property
    def sees_image_through_cross_attention(self) -> bool:
        """The LLM reads the image as cross-attention keys (Mllama), not as image tokens in its sequence."""
        return self.llm_attention_kinds is not None and "cross" in self.llm_attention_kinds

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

    # ---- per-call: the processor's outputs -> model inputs and image layout ----------------------------------
    #: Processor outputs that are not model inputs (the text is rebuilt as prompt + target by the explainer).
    NON_MODEL_KEYS = ("input_ids", "attention_mask", "labels")

    def model_inputs(self, batch) -> dict[str, torch.Tensor]:
        """The processor outputs the model's forward takes besides ``input_ids``/``attention_mask``: every tensor
        of ``batch`` (``pixel_values``, ``image_sizes``, ``pixel_attention_mask``, ``token_type_ids``, ...).
        Tensors shaped like ``input_ids`` are per-token and get extended over the target by the explainer."""
        return {
            k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in self.NON_MODEL_KEYS
        }

    def view_box(self, processor, batch, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The original-image region (pixels) the single view shows (:mod:`rgae.adapters.geometry`).

        A processor that says where the image lies in what the model saw (``batch.image_info[0].content_box`` and
        ``.model_image``, as deco's processor does) is read directly; otherwise the image processor's resize and
        center-crop settings decide."""
        from rgae.adapters.geometry import content_box_view, resize_crop_box

        info = getattr(batch, "image_info", None)
        if info:
            model_hw = tuple(info[0].model_image.shape[:2])
            return content_box_view(info[0].content_box, model_hw, image_size)
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise ValueError(
                f"{type(processor).__name__} has no image_processor: cannot place the patches in the image"
            )
        return resize_crop_box(image_processor, image_size)

    def static_query_to_patch(self) -> tuple[torch.Tensor | None, str]:
        """``([M, N] float64 or None, rule)``: the connector's Query-to-Patch map when it is fixed by its structure.

        Identity for token-wise projectors (a kept CLS query is a placeholder row), the pooling operator for pooled
        ones (also the geometric support of max pooling and the abstractors, whose exact rule depends on the
        target), None for the Q-Former (its map is propagated)."""
        from rgae.rules import pooling_map

        kind = self.projector_kind
        if kind in ("linear", "mlp"):
            eye = torch.eye(self.n_patches, dtype=torch.float64)
            if self.feature_prefix:
                eye = torch.cat([torch.zeros(self.feature_prefix, self.n_patches, dtype=torch.float64), eye])
            return eye, "identity"
        if kind == "qformer":
            return None, "qformer_gae"
        rule = "pooling" if kind == "avgpool" else "gradient"
        return pooling_map(self.patch_grid, self.query_grid, dtype=torch.float64), rule

    def connector_patch_rows(self, layout: ImageLayout, inputs=None) -> torch.Tensor:
        """``[R]`` long: which layout patch each row of the connector's input is (``-1``: a row of this image that is
        no patch, such as a kept CLS token or padding; :data:`OTHER_IMAGE_ROW`: a row of another image of the
        prompt). For Grad-CAM and the gradient Query-to-Patch rule within a structural map
        (``RGAE.attribute(..., q2p_rule="gradient")``), which weigh each patch by its features. ``inputs``: the
        explainer's prepared inputs, for connectors whose input holds every image of the prompt.

        The connector's input is the projector's (what :class:`~rgae.methods.rgae.ProjectorIO` records) viewed as
        ``[R, C]``: one patch's feature vector per row. Default: per view, in layout order, its ``feature_prefix``
        non-patch rows then its patches row-major — the projector input ``[views, prefix + patches, C]`` of the
        Llava pattern. A projector whose input already concatenates the patches of each token (InternVL's, after the
        model's ``pixel_shuffle``) overrides it; its rows are then the ``C``-channel slices of every token.
        """
        rows = []
        for i in range(len(layout.views)):
            patches = torch.arange(layout.view_slice(i).start, layout.view_slice(i).stop)
            rows += [torch.full((self.feature_prefix,), -1, dtype=torch.long), patches]
        return torch.cat(rows)

    def gradient_split_rows(self, layout: ImageLayout, inputs=None) -> torch.Tensor:
        """:meth:`connector_patch_rows` for ``q2p_rule="gradient"``; adapters of models whose image reaches the LLM
        through more than the one connector the rule reads refuse here with the reason."""
        return self.connector_patch_rows(layout, inputs)

    def layout(self, processor, batch, image_size: tuple[int, int]) -> ImageLayout:
        """The :class:`~rgae.layout.ImageLayout` of one image in ``batch`` (the processor's output for one prompt):
        a single view over the patch grid, the image tokens at ``image_token_id``."""
        positions = self.image_positions(batch["input_ids"])
        q2p, rule = self.static_query_to_patch()
        placeholder = torch.zeros(positions.numel(), dtype=torch.bool)
        placeholder[: self.feature_prefix if self.is_identity else 0] = True
        box = self.view_box(processor, batch, image_size)
        return ImageLayout(
            image_size, (View("image", self.patch_grid, box),), positions, q2p, placeholder, rule,
            self.query_grid if self.query_grid is not None else None,
        )

    def patch_tokens(self, layout: ImageLayout, inputs=None) -> torch.Tensor:
        """``[N]`` long: for each patch of ``layout`` (view by view, row-major), the index of its token in the vision
        tower's attention sequence as the capture lays it out (``through_vision``): a tower that encodes the views as
        a batch ``[V, vision_prefix + rows·cols]`` is one block-diagonal sequence, view after view, each starting
        with its ``vision_prefix`` non-patch tokens. Families whose tower orders patches otherwise (packed sequences,
        merge-block order) override this; ``inputs`` (the explainer's ``PreparedInputs``) tells them where the
        layout's image sits among the others of a prompt that packs several images into one vision sequence."""
        grids = {view.grid for view in layout.views}
        if len(grids) != 1:
            raise ValueError(
                f"{type(self.model).__name__}: views of different grids {sorted(grids)}; the default vision token "
                "order assumes one batch of equal views (override ModelAdapter.patch_tokens)"
            )
        (rows, cols), prefix = layout.views[0].grid, self.vision_prefix
        per_view = torch.arange(rows * cols) + prefix
        return torch.cat([per_view + v * (prefix + rows * cols) for v in range(len(layout.views))])

    def image_layouts(self, processor, batch, image_sizes: list[tuple[int, int]]) -> list[ImageLayout]:
        """One :class:`~rgae.layout.ImageLayout` per image of ``batch`` (a prompt showing ``len(image_sizes)``
        images, of those original sizes): :meth:`layout` for one image; families whose prompts hold several images
        override this."""
        if len(image_sizes) != 1:
            raise ValueError(f"{type(self.model).__name__}: one image per prompt is explained for this family, got "
                             f"{len(image_sizes)}")
        return [self.layout(processor, batch, image_sizes[0])]

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

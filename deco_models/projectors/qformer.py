"""``qformer{L}_{M}``: a BLIP-2-style Q-Former projector built from transformers' ``Blip2QFormerModel``.

Layout (parameter names) follows the Q-Former projector of DeCo's LLaVA code base (the ``qformer(\\d+)_(\\d+)``
branch of LLaVA's ``multimodal_projector/builder.py`` as used for ``qformer2_144``): ``query_tokens``
``[1, M, width]``, ``qformer`` (a ``Blip2QFormerModel`` whose width defaults to the vision width, 32-dim heads,
4× FFN, cross-attention every layer, encoder width = vision width) and ``proj`` (``Linear(width, llm)``, GELU,
``Linear(llm, llm)``). Original LLaVA checkpoints store these under ``model.mm_projector.``; strip that prefix.
DeCo's prismatic (one-stage) code base uses a different layout (``projector.qformer_input_proj``, a single-Linear
``projector.proj``, cross-attention every 2nd layer, width = LLM width); build it with ``encoder_width=1408,
width=llm_hidden_size, cross_attention_frequency=2, out_depth=1`` and rename ``proj.weight`` -> ``proj.0.weight``.

Unlike those code bases, queries start from normal(0, 0.02): all-zero queries are identical, get identical
gradients and stay identical forever.
"""

from __future__ import annotations

import torch
from torch import nn

from deco_models.projectors.registry import Projector, ProjectorSpec, register_projector
from rgae.attention_capture import is_capture_implementation

# The transformers class whose forward returns (context, attention_probs) in eager mode; hooks read output[1].
ATTENTION_MODULE_CLASS = "Blip2QFormerMultiHeadAttention"


def _default_num_heads(width: int) -> int:
    # 32-dim heads, as in DeCo's 1024-wide, 32-head Q-Former; one head when the width is not a multiple of 32.
    return width // 32 if width % 32 == 0 else 1


class QFormerProjector(Projector):
    """``qformer{L}_{M}``: M learned queries, L Q-Former layers (query self-attention; cross-attention to the patches
    every ``cross_attention_frequency`` layers), then an MLP to the LLM width.

    Query-to-Patch for R-GAE: GAE through the Q-Former — rules for self-attention over the queries and for
    query→patch cross-attention, over :meth:`attention_layers` in forward order; Q2P = R_qp.

    Options (keyword arguments of ``build_projector``): ``width`` (Q-Former hidden size, default the vision width),
    ``num_heads`` (default width // 32), ``intermediate_size`` (default 4·width), ``cross_attention_frequency``
    (default 1: every layer), ``encoder_width`` (if set and different from the vision width, an input projection
    ``qformer_input_proj = Linear(vision, encoder_width)`` feeds the cross-attention, e.g. 1408 for BLIP-2 weights),
    ``out_depth`` (Linear layers of the output MLP ``proj``, default 2), ``layer_norm_eps`` (1e-12, BLIP-2's).
    Dropout is off (0.0) and attention runs eager so hooks see the probabilities.

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("qformer2_16", 32, 48, (6, 6))
        >>> proj(torch.randn(2, 36, 32)).shape, proj.query_grid, [kind for kind, _ in proj.attention_layers()]
        (torch.Size([2, 16, 48]), (4, 4), ['self', 'cross', 'self', 'cross'])
    """

    kind = "qformer"
    query_to_patch = "qformer_gae"

    def __init__(
        self,
        spec: ProjectorSpec,
        vision_hidden_size: int,
        llm_hidden_size: int,
        grid_hw,
        width: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 1,
        encoder_width: int | None = None,
        out_depth: int = 2,
        layer_norm_eps: float = 1e-12,
    ):
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        super().__init__(spec, vision_hidden_size, llm_hidden_size, grid_hw)
        width = width or vision_hidden_size
        num_heads = num_heads or _default_num_heads(width)
        encoder_width = encoder_width or vision_hidden_size
        for name, value in (
            ("width", width),
            ("num_heads", num_heads),
            ("cross_attention_frequency", cross_attention_frequency),
            ("encoder_width", encoder_width),
            ("out_depth", out_depth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Q-Former option {name} must be a positive int, got {value!r}")
        if width % num_heads:
            raise ValueError(f"Q-Former width {width} is not divisible by num_heads {num_heads}")
        self.width = width
        self.num_layers = spec.layers
        self.cross_attention_frequency = cross_attention_frequency

        config = Blip2QFormerConfig(
            hidden_size=width,
            num_hidden_layers=spec.layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * width,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=encoder_width,
            layer_norm_eps=layer_norm_eps,
        )
        # SDPA returns no attention weights (and transformers only warns): R-GAE and the hooks need eager.
        config._attn_implementation = "eager"

        if encoder_width != vision_hidden_size:
            self.qformer_input_proj = nn.Linear(vision_hidden_size, encoder_width)
        else:
            self.qformer_input_proj = None
        self.query_tokens = nn.Parameter(torch.empty(1, self.num_queries, width))
        nn.init.normal_(self.query_tokens, mean=0.0, std=0.02)
        self.qformer = Blip2QFormerModel(config)
        modules = [nn.Linear(width, llm_hidden_size)]
        for _ in range(1, out_depth):
            modules.append(nn.GELU())
            modules.append(nn.Linear(llm_hidden_size, llm_hidden_size))
        self.proj = nn.Sequential(*modules)

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        """``[("self" | "cross", module), ...]`` in forward order (per layer: self-attention, then cross-attention).

        Each module is a transformers ``Blip2QFormerMultiHeadAttention``; its forward returns
        ``(context, probs)`` and a forward hook reads ``output[1]``: the post-softmax probabilities
        ``[B, heads, M, M]`` (self) or ``[B, heads, M, N]`` (cross, keys = the N patches in row-major grid order).
        """
        layers = []
        for layer in self.qformer.encoder.layer:
            layers.append(("self", layer.attention.attention))
            if layer.has_cross_attention:
                layers.append(("cross", layer.crossattention.attention))
        return layers

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        self._check_input(image_features)
        impl = self.qformer.config._attn_implementation
        if impl != "eager" and not is_capture_implementation(impl):
            # A parent model's set_attn_implementation("sdpa") can reach this nested PreTrainedModel; the Q-Former is
            # tiny next to the LLM, and without eager its hooks would see None instead of attention probabilities.
            # rgae's interface capture (rgae+eager, ...) wraps the kernel and needs no probabilities from it.
            self.qformer.config._attn_implementation = "eager"
        patches = image_features if self.qformer_input_proj is None else self.qformer_input_proj(image_features)
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=patches, return_dict=True).last_hidden_state
        return self.proj(hidden.to(image_features.dtype))


def load_blip2_qformer_state_dict(
    projector: QFormerProjector, state_dict: dict, load_query_tokens: bool = True, prefix: str | None = None
) -> dict:
    """Initialise ``projector.qformer`` (and ``query_tokens``) from a BLIP-2 Q-Former state dict.

    Accepts the keys of a transformers ``Blip2QFormerModel`` (``layernorm.*``, ``encoder.layer.{i}.*``), optionally
    under a prefix (``qformer.``, as in a full ``Blip2ForConditionalGeneration`` checkpoint — detected
    automatically — or ``prefix=``), plus ``query_tokens``. Layers beyond the projector's L, BLIP-2's text-only
    FFN (``intermediate.*``/``output.*``, unused by a projector) and non-Q-Former keys are ignored and reported.
    Missing tensors or shape mismatches raise ValueError naming them (set ``width``/``num_heads``/
    ``encoder_width``/``cross_attention_frequency`` to match; ``load_query_tokens=False`` keeps the projector's
    own queries when their count differs, e.g. BLIP-2's 32 vs M=144).

    Returns ``{"loaded": [...], "ignored": [...]}``.

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> a = build_projector("qformer1_4", 32, 32, (3, 3))
        >>> b = build_projector("qformer1_4", 32, 32, (3, 3))
        >>> sd = {"query_tokens": a.query_tokens.detach(), **a.qformer.state_dict()}
        >>> report = load_blip2_qformer_state_dict(b, sd)
        >>> x = torch.randn(1, 9, 32)
        >>> torch.equal(a.qformer(query_embeds=a.query_tokens, encoder_hidden_states=x).last_hidden_state,
        ...             b.qformer(query_embeds=b.query_tokens, encoder_hidden_states=x).last_hidden_state)
        True
    """
    if not isinstance(projector, QFormerProjector):
        raise ValueError(f"expected a QFormerProjector (spec 'qformer{{L}}_{{M}}'), got {type(projector).__name__}")
    if prefix is None:
        prefix = "qformer." if any(k.startswith("qformer.") for k in state_dict) else ""
    target = projector.qformer.state_dict()
    source, ignored = {}, []
    for key, value in state_dict.items():
        if key in ("query_tokens", prefix + "query_tokens"):
            continue
        if not key.startswith(prefix) or key[len(prefix) :] not in target:
            ignored.append(key)
            continue
        source[key[len(prefix) :]] = value
    missing = sorted(k for k in target if k not in source)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs projector {tuple(target[k].shape)}"
        for k, v in source.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    query = state_dict.get("query_tokens", state_dict.get(prefix + "query_tokens"))
    if load_query_tokens:
        if query is None:
            missing.append("query_tokens")
        elif tuple(query.shape) != tuple(projector.query_tokens.shape):
            mismatched.append(
                f"query_tokens: checkpoint {tuple(query.shape)} vs projector {tuple(projector.query_tokens.shape)} "
                "(pass load_query_tokens=False to keep the projector's own queries)"
            )
    if missing or mismatched:
        lines = []
        if missing:
            shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
            lines.append(f"missing tensors: {shown}")
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched[:12]))
        raise ValueError(
            "cannot initialise the Q-Former projector from this BLIP-2 state dict: "
            + " | ".join(lines)
            + f". The projector has width {projector.width}, {projector.num_layers} layers, cross-attention every "
            f"{projector.cross_attention_frequency} layer(s); match them with build_projector(..., width=, "
            "num_heads=, encoder_width=, cross_attention_frequency=) (BLIP-2: width=768, num_heads=12, "
            "encoder_width=1408, cross_attention_frequency=2)."
        )
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)
        if load_query_tokens:
            projector.query_tokens.copy_(query)
    loaded = sorted(source) + (["query_tokens"] if load_query_tokens else [])
    return {"loaded": loaded, "ignored": sorted(ignored)}


@register_projector("qformer{L}_{M}")
def _build_qformer(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return QFormerProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)

"""R-GAE (DeCo §3.1, Appendix A): Text-to-Query through the LLM, Query-to-Patch through the projector, composed.

One teacher-forced forward records every attention probability tensor (LLM, Q-Former, optionally the ViT) with its
graph; then, per target token t, one ``autograd.grad`` of the token's **raw logit** at the predicting position
``p_t - 1`` gives ``G`` for all layers, and each layer is reduced to ``mean_h (G ⊙ A)+`` at once.

* Text-to-Query: row ``p_t - 1`` of ``R = (I + Abar_L) ... (I + Abar_1)`` (the row trick, :func:`rgae.rules.
  propagate_rows`), restricted to the image-token columns: ``[M]``.
* Query-to-Patch, by projector kind:

  - ``linear`` / ``mlp``: the identity;
  - ``avgpool``: the pooling operator :func:`rgae.rules.pooling_map` (target-independent);
  - ``qformer``: GAE through the Q-Former's query self-attention and query→patch cross-attention layers
    (:func:`rgae.rules.propagate_cross_stack`) with this target's gradients, ``Q2P_t = R_qk``;
  - ``maxpool`` / ``cabstractor`` / ``dabstractor`` (no attention to follow): the **gradient rule** below;
  - the families' connectors (:mod:`rgae.adapters`): the layout's structural map (identity per view, pooling,
    ``block`` for pixel shuffle / patch mergers, ``bilinear``); ``q2p_rule="gradient"`` splits it within its
    support per target token by the gradient rule, with ``y`` the LLM's input embeddings and ``x`` the connector's
    input rows mapped to patches (:class:`StructuralGradientSplit`).

* ``through_vision=True``: the ViT's self-attention layers up to ``vision_feature_layer`` are propagated too
  (``R_vit = (I + Abar_k) ... (I + Abar_1)`` from this target's gradients), normalized with
  :func:`rgae.rules.normalize_residual`, and Query-to-Patch becomes ``Q2P · R̄_vit[feature tokens, patch tokens]``
  (for the Q-Former, ``R_vit`` restricted to the feature tokens enters the stack as ``R_kk``, as GAE prescribes).
* Text-to-Patch: ``T2P_t = T2Q_t · Q2P_t``; the sentence maps are means over t (:class:`~rgae.Explanation`).

Gradient rule for projectors without attention. Let ``x [N, C]`` be the patch features entering the projector,
``y = f(x) [M, D]`` its output tokens and ``g_q = ∂logit_t/∂y_q`` the target's gradient at query q. Query q's
first-order contribution to the logit is ``s_q = <g_q, y_q>``; with ``g_q`` held fixed, patch p's share of it is the
gradient × input ``(Σ_c x_pc · ∂s_q/∂x_pc)`` = ``<x_p, (J_q(x)ᵀ g_q)_p>``. We keep the positive part and normalize each
row to sum 1 (a row with no positive entry stays zero), so a row is a distribution over patches like the pooling
operator's rows: ``Q2P_t[q, p] = (x_p · (J_qᵀ g_q)_p)+ / Σ_p' (x_p' · (J_qᵀ g_q)_p')+``. For max pooling it lands on
the argmax patches of q's window; for the abstractors it follows their convolutional receptive field, weighted by
what the target uses. It costs one batched vector-Jacobian product of the (small) projector per target token.
The explained scalar is a raw logit, so the maps are not normalized otherwise (R-GAE is not scale invariant).

Example:
    >>> from rgae import RGAE
    >>> exp = RGAE(model, processor).attribute("cat.jpg", target="A cat on a sofa")  # doctest: +SKIP
    >>> exp.patch_map(word="cat").shape  # doctest: +SKIP
    torch.Size([24, 24])
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from rgae.methods.base import Explainer, PreparedInputs
from rgae.methods.relevance import coverage_options, relevance_source
from rgae.rules import identity_map, normalize_residual, pooling_map, propagate_cross_stack


class ProjectorIO:
    """Forward hook keeping the projector's input (patch features) and output (LLM image tokens).

    The input is the projector's first positional argument, or its keyword argument ``input_key`` for projectors
    called with keywords only (BLIP-2's Q-Former reads the patches as ``encoder_hidden_states``).

    ``require_graph``: an output without a graph (frozen parameters, nothing upstream requires grad) is replaced by an
    equal leaf that requires grad, so the target's gradient w.r.t. it exists. ``leaf_input``: likewise for the input
    (the gradient rule differentiates the LLM's input embeddings w.r.t. it).
    """

    def __init__(self, projector, input_key: str | None = None, require_graph: bool = False,
                 leaf_input: bool = False):
        self.projector = projector
        self.input_key = input_key
        self.require_graph = require_graph
        self.leaf_input = leaf_input
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handles = []

    def _pre_hook(self, module, args, kwargs):
        x = kwargs[self.input_key] if self.input_key else args[0]
        if not torch.is_grad_enabled() or x.requires_grad:
            return None
        x = x.detach().requires_grad_(True)
        if self.input_key:
            return args, {**kwargs, self.input_key: x}
        return (x, *args[1:]), kwargs

    def _hook(self, module, args, kwargs, out):
        self.input = kwargs[self.input_key] if self.input_key else args[0]
        self.output = out if isinstance(out, torch.Tensor) else out[0]
        if self.require_graph and torch.is_grad_enabled() and not self.output.requires_grad:
            self.output = self.output.detach().requires_grad_(True)
            return self.output if isinstance(out, torch.Tensor) else (self.output, *out[1:])
        return None

    def __enter__(self):
        if self.leaf_input:
            self._handles.append(self.projector.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(self.projector.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LanguageModelInput:
    """Forward pre-hook keeping the ``inputs_embeds`` the language model receives (``[1, S, D]``, with its graph):
    the connector's whole output as the LLM reads it, newline and placeholder tokens included."""

    def __init__(self, language_model):
        self.language_model = language_model
        self.embeds: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        self.embeds = kwargs.get("inputs_embeds", args[0] if args else None)

    def __enter__(self):
        self._handle = self.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def gradient_rule_q2p(projector, features: torch.Tensor, grad_out: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``[M, N]`` Query-to-Patch of the gradient rule (module docs) for one target.

    Args:
        projector: the projector module, ``[1, N, C] -> [1, M, D]``.
        features: ``[1, N, C]`` its input patch features.
        grad_out: ``[1, M, D]`` the target's gradient at its output.
    """
    x = features.detach().requires_grad_(True)
    with torch.enable_grad():
        y = projector(x)
    m = y.shape[1]
    g = grad_out.detach()[0]
    rows = []
    for start in range(0, m, chunk):
        idx = torch.arange(start, min(start + chunk, m), device=y.device)
        cot = torch.zeros(len(idx), *y.shape, dtype=y.dtype, device=y.device)
        cot[torch.arange(len(idx)), 0, idx] = g[idx]
        try:
            (vj,) = torch.autograd.grad(y, x, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
        except RuntimeError:  # an op without a batching rule: one vector-Jacobian product per query
            vj = torch.stack([torch.autograd.grad(y, x, grad_outputs=c, retain_graph=True)[0] for c in cot])
        rows.append((vj[:, 0] * x.detach()[0]).sum(-1))
    contrib = torch.cat(rows).clamp(min=0)
    total = contrib.sum(-1, keepdim=True)
    return contrib / torch.where(total > 0, total, torch.ones_like(total))


def disjoint_query_groups(support: torch.Tensor) -> list[torch.Tensor]:
    """Queries grouped so that no two in a group share a patch (greedy colouring of the rows of ``support [M, N]``,
    bool); queries without patches are left out. One group when every patch feeds at most one query (identity,
    blocks, non-overlapping pooling); a few for overlapping windows (bilinear weights).

    Example:
        >>> support = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
        >>> [g.tolist() for g in disjoint_query_groups(support)]
        [[0], [1, 3]]
    """
    support = support.bool()
    if bool((support.sum(0) <= 1).all()):
        used = support.any(1).nonzero().flatten()
        return [used] if used.numel() else []
    colors: list[list[int]] = []
    taken: list[set[int]] = [set() for _ in range(support.shape[1])]  # per patch, the colours of its queries
    patches_of = [row.nonzero().flatten().tolist() for row in support.cpu()]
    for q, patches in enumerate(patches_of):
        if not patches:
            continue
        busy = set().union(*(taken[p] for p in patches))
        color = next(c for c in range(len(colors) + 1) if c not in busy)
        if color == len(colors):
            colors.append([])
        colors[color].append(q)
        for p in patches:
            taken[p].add(color)
    return [torch.tensor(c, dtype=torch.long) for c in colors]


class StructuralGradientSplit:
    """``q2p_rule="gradient"`` within a structural Query-to-Patch map: the gradient rule (module docs) with ``y`` the
    LLM's input embeddings at the image positions (the connector's whole output, after newline/placeholder
    insertion) and ``x`` the connector's input rows mapped to the layout's patches
    (:meth:`~rgae.adapters.ModelAdapter.connector_patch_rows`):
    ``Q2P_t[q, p] = (x_p · (J_qᵀ g_q)_p)+ / Σ_p' (x_p' · (J_qᵀ g_q)_p')+`` over the patches of q's structural
    support (its block, pooling window, interpolation taps); placeholder tokens keep zero rows.

    The queries of a group of :func:`disjoint_query_groups` share one vector-Jacobian product: with disjoint
    supports, patch p's entry of ``J_Gᵀ g_G`` comes from the one query of the group whose support holds p (the
    others do not depend on it), so one product per group gives every ``J_qᵀ g_q`` — one for a block connector.
    """

    def __init__(self, layout, patch_rows: torch.Tensor, features: torch.Tensor, embeds: torch.Tensor):
        self.layout, self.features, self.embeds = layout, features, embeds
        n_rows = int(patch_rows.numel())
        if n_rows == 0 or features.numel() % n_rows:
            raise ValueError(
                f"the connector's input {tuple(features.shape)} does not split into the {n_rows} patch rows the "
                "adapter's connector_patch_rows gives"
            )
        device = features.device
        self.rows = patch_rows.to(device)
        self.valid = self.rows >= 0
        support = layout.query_to_patch != 0
        self.groups = [g.to(device) for g in disjoint_query_groups(support)]
        n = layout.n_patches
        self.owner = torch.full((len(self.groups), n), -1, dtype=torch.long, device=device)
        for i, queries in enumerate(self.groups):
            q, p = support[queries.cpu()].nonzero(as_tuple=True)
            self.owner[i, p.to(device)] = queries[q.to(device)]
        self.positions = layout.positions.to(device)
        self.x_rows = features.detach().reshape(n_rows, -1)

    def __call__(self, grad_embeds: torch.Tensor | None) -> torch.Tensor:
        """``[M, N]`` for one target from ``∂logit/∂inputs_embeds [1, S, D]`` (None: the target does not depend on
        the image)."""
        m, n = self.layout.n_tokens, self.layout.n_patches
        dtype = self.x_rows.dtype
        q2p = torch.zeros(m, n, dtype=dtype, device=self.x_rows.device)
        if grad_embeds is None or not self.groups:
            return q2p
        cot = grad_embeds.new_zeros(len(self.groups), *self.embeds.shape)
        for i, queries in enumerate(self.groups):
            pos = self.positions[queries]
            cot[i, 0, pos] = grad_embeds[0, pos]
        try:
            (vj,) = torch.autograd.grad(self.embeds, self.features, grad_outputs=cot, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one vector-Jacobian product per group
            vj = [torch.autograd.grad(self.embeds, self.features, grad_outputs=c, retain_graph=True,
                                      allow_unused=True)[0] for c in cot]
            vj = None if vj[0] is None else torch.stack(vj)
        if vj is None:
            return q2p
        row_contrib = (vj.reshape(len(self.groups), *self.x_rows.shape) * self.x_rows).sum(-1)  # [G, R]
        contrib = row_contrib.new_zeros(len(self.groups), n)
        contrib[:, self.rows[self.valid]] = row_contrib[:, self.valid]
        g, p = (self.owner >= 0).nonzero(as_tuple=True)
        q2p[self.owner[g, p], p] = contrib[g, p].to(dtype)
        q2p = q2p.clamp(min=0)
        total = q2p.sum(-1, keepdim=True)
        return q2p / torch.where(total > 0, total, torch.ones_like(total))


#: What ``q2p_rule`` may be: the connector's own rule (the layout's), or the gradient rule split within it.
Q2P_RULES = ("structural", "gradient")

#: Query-to-Patch rules fixed by the connector's structure (the layout carries the map); the others (gradient,
#: Q-Former GAE) depend on the target and are computed per token.
STRUCTURAL_RULES = ("identity", "pooling", "block", "bilinear")

AUTO_GRAD_BATCH = 16
AUTO_GRAD_BATCH_BYTES = 2 * 1024**3


def auto_grad_batch(target_logits: torch.Tensor, tensors: list[torch.Tensor]) -> int:
    """How many target tokens to differentiate at once when the caller did not say: 1 on the CPU (batching buys
    nothing there: both ways pay one backward per token), on CUDA up to 16 while the batched gradients of the
    recorded tensors stay within 2 GiB and a quarter of the free memory. On an H100 the bench model's 16-token
    explanation took 0.09 s batched against 0.28 s one token at a time (bench/bench_explain.py)."""
    if not target_logits.is_cuda:
        return 1
    per_token = sum(t.numel() * t.element_size() for t in tensors)
    free, _ = torch.cuda.mem_get_info(target_logits.device)
    budget = min(AUTO_GRAD_BATCH_BYTES, free // 4)
    return int(max(1, min(AUTO_GRAD_BATCH, target_logits.numel(), budget // max(per_token, 1))))


def gradient_batches(target_logits: torch.Tensor, tensors: list[torch.Tensor], grad_batch: int | None = None):
    """Yield ``(targets, grads)``: a list of target indices and, per tensor, their gradients stacked ``[k, ...]``
    (None where unused), one backward pass per batch, graph retained.

    ``grad_batch=1``: one ``autograd.grad`` per target token. ``grad_batch=k``: k tokens at once with
    ``is_grads_batched=True`` (vmap over the backward): the same numbers with fewer, larger kernels (worth it on
    GPUs; memory grows k-fold). ``None``: :func:`auto_grad_batch`.
    """
    n = target_logits.numel()
    if grad_batch is None:
        grad_batch = auto_grad_batch(target_logits, tensors)
    # The gradients are yielded without a local name: a suspended generator would keep the last batch alive while
    # the consumer computes the next one (one more set of gradients at the peak).
    if not grad_batch or grad_batch <= 1:
        for t in range(n):
            yield [t], [None if g is None else g.unsqueeze(0)
                        for g in torch.autograd.grad(target_logits[t], tensors, retain_graph=True, allow_unused=True)]
        return
    for start in range(0, n, grad_batch):
        idx = torch.arange(start, min(n, start + grad_batch), device=target_logits.device)
        basis = torch.zeros(len(idx), n, dtype=target_logits.dtype, device=target_logits.device)
        basis[torch.arange(len(idx)), idx] = 1.0
        yield idx.tolist(), list(torch.autograd.grad(target_logits, tensors, grad_outputs=basis,
                                                     is_grads_batched=True, retain_graph=True, allow_unused=True))


def gradient_groups(batches, group: int):
    """Gather consecutive ``(targets, grads)`` of :func:`gradient_batches` into groups of at least ``group`` targets
    (the last may be smaller), each tensor's gradients in one ``[k, ...]`` tensor; ``group <= 1`` passes the
    batches through."""
    if group <= 1:
        yield from batches
        return
    pending, count = [], 0
    for targets, grads in batches:
        pending.append((targets, grads))
        count += len(targets)
        if count >= group:
            yield _merge(pending)
            pending, count = [], 0
    if pending:
        yield _merge(pending)


def _merge(pending: list) -> tuple[list[int], list[torch.Tensor | None]]:
    targets = [t for ts, _ in pending for t in ts]
    merged = []
    for i in range(len(pending[0][1])):
        ref = next((grads[i] for _, grads in pending if grads[i] is not None), None)
        if ref is None:  # the targets do not depend on this tensor
            merged.append(None)
            continue
        buf = ref.new_empty((len(targets), *ref.shape[1:]))
        start = 0
        for ts, grads in pending:
            part = buf[start : start + len(ts)]
            part.zero_() if grads[i] is None else part.copy_(grads[i])
            grads[i] = None  # each batch's copy goes as soon as it is in the group's tensor
            start += len(ts)
        merged.append(buf)
    return targets, merged


def gradients_per_target(target_logits: torch.Tensor, tensors: list[torch.Tensor], grad_batch: int | None = None):
    """Yield ``(t, [d target_logits[t] / d tensor for tensor in tensors])`` (None where unused); see
    :func:`gradient_batches`."""
    for targets, grads in gradient_batches(target_logits, tensors, grad_batch):
        for k, t in enumerate(targets):
            yield t, [None if g is None else g[k] for g in grads]


class RGAE(Explainer):
    """R-GAE relevance maps (see the module docs for the exact rules).

    ``attribute(image, target=None, prompt=None, through_vision=False, max_new_tokens=32, progress=False,
    grad_batch=None, capture="interface", q2p_rule="structural")`` returns an :class:`~rgae.Explanation` with
    per-token ``text_to_query [T, M]``, ``text_to_patch [T, N]`` and ``query_to_patch [M, N]`` (the mean over target
    tokens when it depends on the target: Q-Former, gradient rule, ``through_vision``; then ``T2P_t = T2Q_t ·
    Q2P_t`` uses each token's own map).
    ``grad_batch``: target tokens differentiated per backward pass (None: batched on CUDA within a memory budget,
    one at a time on the CPU; see :func:`auto_grad_batch`); the maps are the same either way.
    ``q2p_rule``: ``"structural"`` (default: the connector's own rule, the layout's) or ``"gradient"`` (a structural
    rule split within its support by the gradient rule, per target token; ``options["query_to_patch_rule"]`` then
    reads e.g. ``"gradient within block (mean over target tokens)"``).
    """

    method = "rgae"

    def _attribute(self, inputs: PreparedInputs, through_vision: bool = False, progress: bool = False,
                   grad_batch: int | None = None, capture: str = "interface", q2p_rule: str = "structural",
                   **unknown):
        if unknown:
            raise TypeError(
                f"unknown RGAE options: {sorted(unknown)} (known: through_vision, grad_batch, capture, q2p_rule, "
                "max_new_tokens, progress)"
            )
        result = self.compute(inputs, through_vision=through_vision, progress=progress, grad_batch=grad_batch,
                              capture=capture, q2p_rule=q2p_rule)
        return self.pack(
            inputs,
            text_to_patch=result["text_to_patch"],
            token_probs=result["token_probs"],
            text_to_query=result["text_to_query"],
            query_to_patch=result["query_to_patch"],
            options={
                "through_vision": bool(through_vision),
                "projector_kind": self.adapter.projector_kind,
                "query_to_patch_rule": self.query_to_patch_rule(inputs.layout, through_vision, q2p_rule),
                "q2p_rule": q2p_rule,
                "explained_scalar": "raw logit of the target token at the predicting position",
                "capture": capture,
                **coverage_options(self.adapter),
                **self._non_patch_option(result["non_patch_share"]),
            },
        )

    @staticmethod
    def _non_patch_option(share) -> dict:
        """``non_patch_share``: per target token, the share of its Q-Former relevance that landed on a CLS token
        (no pixel box: not in Text-to-Patch)."""
        return {} if share is None else {"non_patch_share": [float(v) for v in share]}

    @staticmethod
    def query_to_patch_rule(layout, through_vision: bool, q2p_rule: str = "structural") -> str:
        """What ran, for ``options["query_to_patch_rule"]``: the layout's rule (``"block"``, ...), ``"gradient
        within block"`` for the gradient split of a structural rule; ``(mean over target tokens)`` when the map
        depends on the target."""
        rule = layout.rule
        if q2p_rule == "gradient" and rule in STRUCTURAL_RULES:
            rule = f"gradient within {rule}"
        if rule not in STRUCTURAL_RULES:
            rule += " (mean over target tokens)"
        return rule + (" · vit_gae" if through_vision else "")

    def _check_q2p_rule(self, q2p_rule: str, layout, through_vision: bool) -> bool:
        """Whether the gradient split of a structural rule runs (``ValueError`` where ``q2p_rule`` cannot)."""
        if q2p_rule not in Q2P_RULES:
            raise ValueError(f"q2p_rule must be one of {Q2P_RULES}, got {q2p_rule!r}")
        if q2p_rule == "structural" or layout.rule not in STRUCTURAL_RULES:
            return False  # the layout's own rule (the gradient rule already, for max pooling and the abstractors)
        name = type(self.model).__name__
        if self.adapter.sees_image_through_cross_attention:
            raise ValueError(f"q2p_rule='gradient' needs image tokens in the LLM's input; {name} reads the image "
                             "through cross-attention only")
        if through_vision and self.adapter.feature_prefix:
            raise ValueError(f"q2p_rule='gradient' with through_vision=True composes over the layout's patches; "
                             f"{name}'s connector also reads {self.adapter.feature_prefix} non-patch feature(s)")
        return True

    def compute(self, inputs: PreparedInputs, through_vision: bool = False, progress: bool = False,
                grad_batch: int | None = None, capture: str = "interface", q2p_rule: str = "structural") -> dict:
        """The raw maps as a dict (``text_to_query``, ``query_to_patch``, ``query_to_patch_per_token``,
        ``text_to_patch``, ``token_probs``); :meth:`attribute` packs them into an Explanation.

        ``capture``: ``"interface"`` (default: the model's own attention kernel, probabilities recomputed in chunks)
        or ``"eager"`` (eager attention with every probability tensor recorded; the reference). Same maps.
        ``q2p_rule``: ``"structural"`` (default: the layout's rule) or ``"gradient"`` (a structural rule split
        within its support per target token, :class:`StructuralGradientSplit`)."""
        split = self._check_q2p_rule(q2p_rule, inputs.layout, through_vision)
        ad = self.adapter
        kind = ad.projector_kind
        views, rule = len(inputs.layout.views), inputs.layout.rule
        # Structural rules over patches only compose with the tower's relevance through the layout (any views);
        # a kept CLS feature or a target-dependent rule composes over the projector's input, one view.
        through_layout = through_vision and rule in STRUCTURAL_RULES and not ad.feature_prefix
        if through_vision and (ad.sees_image_through_cross_attention or (views > 1 and not through_layout)):
            raise ValueError(
                f"through_vision=True is not supported yet for {type(self.model).__name__}: its image layout has "
                f"{views} view(s) and the {rule!r} Query-to-Patch rule"
                + (", and its LLM reads the image through cross-attention" if ad.sees_image_through_cross_attention
                   else f" with {ad.feature_prefix} non-patch feature(s) entering the connector")
                + "; use through_vision=False"
            )
        patch_tokens = ad.patch_tokens(inputs.layout, inputs) if through_layout else None
        cross_llm = ad.sees_image_through_cross_attention
        source = relevance_source(capture, self.model, ad, through_vision, full_llm_cams=cross_llm)
        needs_io = kind != "qformer" and rule not in STRUCTURAL_RULES  # the gradient rule reads the projector's output
        io = ProjectorIO(ad.projector, ad.projector_input, require_graph=needs_io and source.capture == "interface",
                         leaf_input=split)
        llm_input = LanguageModelInput(ad.language_model)

        with contextlib.ExitStack() as stack:
            source.enter(stack)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(io)
            if split:
                stack.enter_context(llm_input)
            logits, offset = self.forward(inputs)
            recorded = source.after_forward()
            target_logits = self.target_logits(logits, inputs, offset)
            probs = self.token_probs(logits, inputs, offset)
            extra = [io.output] if needs_io else []
            if needs_io and (io.output is None or not io.output.requires_grad):
                raise RuntimeError("the projector's output was not recorded with a graph")
            splitter = self._gradient_split(inputs.layout, io, llm_input, inputs) if split else None
            if split:
                extra = [llm_input.embeds]

            image_pos = inputs.image_positions
            device = logits.device
            dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
            layout = inputs.layout
            static_q2p = None
            if layout.rule in STRUCTURAL_RULES:
                static_q2p = layout.query_to_patch.to(dtype=dtype, device=device)

            t2q_rows, q2p_maps, non_patch = [], [], []
            rows = inputs.predicting_positions.tolist()
            bar = tqdm(total=target_logits.numel(), desc="R-GAE", disable=not progress, leave=False)
            batches = gradient_batches(target_logits, [*recorded, *extra], grad_batch)
            for targets, batch in gradient_groups(batches, source.group_size(recorded, target_logits.numel())):
                # The Text-to-Query rows (and Q-Former / ViT maps) of a group of targets at once: the interface
                # capture recomputes each chunk of probabilities once for the whole group.
                maps = source.maps([rows[t] for t in targets], batch[: len(recorded)])
                for k, (llm_out, proj_cams, r_vit) in enumerate(maps):
                    bar.update(1)
                    grads = [None if g is None else g[k] for g in batch]
                    if cross_llm:  # llm_out: every LLM layer's cam, for the bi-modal rules
                        t2q = self._cross_llm_t2q(llm_out, rows[targets[k]])[image_pos].to(dtype)
                    else:  # llm_out: the row-trick row of R
                        t2q = llm_out[image_pos].to(dtype)
                    t2q_rows.append(t2q)

                    if kind == "qformer":
                        r_qk = self._qformer_q2p(proj_cams, r_vit)
                        q2p = r_qk[:, ad.feature_prefix :]
                        if ad.feature_prefix:
                            non_patch.append(self._non_patch_share(t2q, r_qk))
                    elif splitter is not None:
                        q2p = splitter(grads[-1]).to(dtype)
                        if patch_tokens is not None:
                            q2p = self._through_patches(q2p, r_vit, patch_tokens)
                    elif static_q2p is not None:
                        q2p = static_q2p
                        if patch_tokens is not None:
                            q2p = self._through_patches(static_q2p, r_vit, patch_tokens)
                        elif r_vit is not None:
                            q2p = self._compose_vit(self._feature_q2p(dtype, device), r_vit)
                    elif grads[-1] is None:  # the target does not depend on the image at all
                        q2p = torch.zeros(layout.n_tokens, layout.n_patches, dtype=dtype, device=device)
                    else:
                        q2p_feat = gradient_rule_q2p(ad.projector, io.input, grads[-1]).to(dtype)
                        q2p = (self._compose_vit(q2p_feat, r_vit) if r_vit is not None
                               else q2p_feat[:, ad.feature_prefix :])
                    q2p_maps.append(q2p)
                # Before the next group's backward passes: this group's gradients go (held, they doubled the peak).
                del batch, grads, maps
            bar.close()

        t2q = torch.stack(t2q_rows)
        per_token = len({id(m) for m in q2p_maps}) > 1
        if per_token:
            q2p_stack = torch.stack(q2p_maps)
            t2p = torch.einsum("tm,tmn->tn", t2q, q2p_stack)
            q2p_mean = q2p_stack.mean(0)
        else:
            q2p_stack = None
            q2p_mean = q2p_maps[0]
            t2p = t2q @ q2p_mean
        return {
            "text_to_query": t2q.detach(),
            "query_to_patch": q2p_mean.detach(),
            "query_to_patch_per_token": None if q2p_stack is None else q2p_stack.detach(),
            "text_to_patch": t2p.detach(),
            "token_probs": probs,
            "non_patch_share": torch.stack(non_patch).detach().cpu() if non_patch else None,
        }

    # ---- Query-to-Patch helpers --------------------------------------------------------------------------------
    @staticmethod
    def _through_patches(q2p: torch.Tensor, r_vit: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``Q2P · R̄_vit[patch tokens][:, patch tokens]``: a map over the layout's patches through the tower, every
        view."""
        tok = patch_tokens.to(q2p.device)
        return q2p @ normalize_residual(r_vit)[tok][:, tok].to(q2p.dtype)

    def _gradient_split(self, layout, io: ProjectorIO, llm_input: LanguageModelInput,
                        inputs=None) -> StructuralGradientSplit:
        name = type(self.model).__name__
        if io.input is None or not io.input.requires_grad:
            raise RuntimeError(f"{name}: the connector's input was not recorded with a graph")
        if llm_input.embeds is None or not llm_input.embeds.requires_grad:
            raise RuntimeError(f"{name}: the language model's inputs_embeds were not recorded with a graph")
        rows = self.adapter.gradient_split_rows(layout, inputs)
        return StructuralGradientSplit(layout, rows, io.input, llm_input.embeds)

    def _feature_q2p(self, dtype, device) -> torch.Tensor:
        """``[M, N_features]`` over the projector's input tokens (patches plus a kept CLS) for static kinds."""
        ad = self.adapter
        if ad.projector_kind in ("linear", "mlp"):
            return identity_map(ad.n_features, dtype=dtype, device=device)
        return pooling_map(ad.patch_grid, ad.query_grid, dtype=dtype, device=device)

    def _vit_rows(self) -> slice:
        ad = self.adapter
        return slice(ad.vision_prefix - ad.feature_prefix, None)

    def _compose_vit(self, q2p_feat: torch.Tensor, r_vit: torch.Tensor) -> torch.Tensor:
        """``Q2P_feat · R̄_vit[feature tokens, patch tokens]``."""
        ad = self.adapter
        r_bar = normalize_residual(r_vit)
        return q2p_feat @ r_bar[self._vit_rows(), ad.vision_prefix :]

    def _cross_llm_t2q(self, cams, row: int) -> torch.Tensor:
        """Text-to-Query of an LLM that reads the image only through cross-attention layers (Mllama): the bi-modal
        GAE rules over its layers in forward order, the text as one stream and the cross-attention keys (the
        image's tokens) as the other, ``R_kk = I`` (:func:`rgae.rules.propagate_cross_stack`): self-attention
        ``R_tt += cam·R_tt``, ``R_tk += cam·R_tk``; cross-attention ``R_tk += R̄_ttᵀ·cam·R̄_kk``. Row ``row`` of
        ``R_tk`` over all keys. The transpose needs the whole ``R̄_tt``, so this costs ``O(L·S³)`` (no row trick)."""
        kinds = self.adapter.llm_attention_kinds
        layers = list(zip(kinds, cams))
        n_text = cams[0].shape[-2]
        n_keys = next(c.shape[-1] for k, c in layers if k == "cross")
        _, r_tk = propagate_cross_stack(layers, n_text, n_keys)
        return r_tk[row]

    def _qformer_q2p(self, cams, r_vit) -> torch.Tensor:
        """``[M, N_features]`` R_qk of the Q-Former for one target, over all its keys (a kept CLS included).

        The self-attention may run over more tokens than the M queries: InstructBLIP appends the instruction's
        tokens, which attend and are attended to but never cross-attend to the image. The stream is then the
        queries followed by those tokens; their rows of each cross-attention map are zero (what attention they
        do not pay contributes nothing), and only the queries' rows reach the LLM."""
        ad = self.adapter
        layers = [(kind, cam) for (kind, _), cam in zip(ad.projector_attention, cams)]
        n_keys = cams[[k for k, _ in ad.projector_attention].index("cross")].shape[-1]
        n_stream = max([cam.shape[-1] for kind, cam in layers if kind == "self"], default=ad.n_queries)
        if n_stream < ad.n_queries:
            raise ValueError(f"the Q-Former's self-attention covers {n_stream} tokens, fewer than its "
                             f"{ad.n_queries} queries")
        for i, (kind, cam) in enumerate(layers):
            if kind == "cross" and cam.shape[-2] < n_stream:
                layers[i] = (kind, torch.cat([cam, cam.new_zeros(n_stream - cam.shape[-2], cam.shape[-1])]))
        r_kk = None
        if r_vit is not None:
            rows = self._vit_rows()
            r_kk = r_vit[rows, rows]
        _, r_qk = propagate_cross_stack(layers, n_stream, n_keys, R_kk=r_kk)
        return r_qk[: ad.n_queries]

    def _non_patch_share(self, t2q: torch.Tensor, r_qk: torch.Tensor) -> torch.Tensor:
        """The share of ``T2Q · R_qk`` on the projector's non-patch inputs (a CLS the Q-Former reads), which have
        no pixel box and are left out of Text-to-Patch (0 when the token has no image relevance at all)."""
        full = t2q.to(r_qk.dtype) @ r_qk
        total = full.sum()
        return full[: self.adapter.feature_prefix].sum() / total if total > 0 else total.new_zeros(())

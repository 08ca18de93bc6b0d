"""Independent checks every model family's tests share: a full-matrix R-GAE oracle over the LLM and probes of what
the LLM receives at the image positions. Written without rgae's engine (plain torch), so they can catch it.

Typical use in a family's test file:
    >>> explainer = RGAE(model, processor)                          # doctest: +SKIP
    >>> inputs = explainer.prepare(image, "a red circle", None)    # doctest: +SKIP
    >>> oracle = full_matrix_text_to_query(model, inputs)           # doctest: +SKIP
    >>> fast = explainer.compute(inputs)["text_to_query"]           # doctest: +SKIP
    >>> assert_close_relative(fast, oracle, 1e-6)                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch


def _attention_to_eager(model):
    """Every (sub-)config switched to eager attention, restored after: returns a context manager."""
    configs, seen = [], set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        stack = [cfg] if cfg is not None else []
        while stack:
            c = stack.pop()
            if c is None or id(c) in seen or not hasattr(c, "to_dict"):
                continue
            seen.add(id(c))
            configs.append(c)
            stack.extend(getattr(c, k, None) for k in (getattr(c, "sub_configs", {}) or {}))

    @contextlib.contextmanager
    def switched():
        before = [(c, getattr(c, "_attn_implementation", None)) for c in configs]
        try:
            for c in configs:
                if hasattr(c, "_attn_implementation"):
                    c._attn_implementation = "eager"
            yield
        finally:
            for c, value in before:
                if hasattr(c, "_attn_implementation"):
                    c._attn_implementation = value

    return switched()


def full_matrix_text_to_query(model, inputs) -> torch.Tensor:
    """``[T, M]`` float64 Text-to-Query by the definition, as slowly as it reads.

    One teacher-forced forward over prompt + target with ``output_attentions=True`` (eager), then for every target
    token t: the gradient of its raw logit (at the position that predicts it) w.r.t. every LLM layer's attention
    probabilities, ``cam_l = mean_h (G ⊙ A)+`` (clamp per head), the full ``R = (I + cam_L) ⋯ (I + cam_1)`` and its
    row ``p_t - 1`` at the image positions. ``inputs`` is an explainer's ``PreparedInputs``.
    """
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    with _attention_to_eager(model), torch.enable_grad():
        out = model(**inputs.model_kwargs(), output_attentions=True, use_cache=False)
        # BLIP-2 / InstructBLIP keep the language model's own outputs nested.
        nested = getattr(out, "language_model_outputs", None)
        attentions = [a for a in (nested if nested is not None else out).attentions if a is not None]
        if not attentions:
            raise AssertionError("the model returned no LLM attention probabilities in eager mode")
        n = inputs.input_ids.shape[1]
        rows = []
        for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
            logit = out.logits[0, pos, tok]
            grads = torch.autograd.grad(logit, attentions, retain_graph=True, allow_unused=True)
            R = torch.eye(n, dtype=torch.float64)
            for a, g in zip(attentions, grads):
                if g is None:
                    continue
                cam = (g[0].double() * a[0].detach().double()).clamp(min=0).mean(0)
                R = R + cam @ R
            rows.append(R[pos, inputs.image_positions.cpu()])
    return torch.stack(rows)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """``max |actual - expected| <= rtol · max |expected|`` (and ``expected`` is not all zero: a degenerate case
    proves nothing)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = float(expected.abs().max())
    assert scale > 0, "degenerate case: the expected map is all zero"
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} × {scale:.3e}"


def llm_image_embeddings(model, inputs, language_model=None, **overrides) -> torch.Tensor:
    """``[M, D]`` what the LLM receives at the image positions (its ``inputs_embeds`` rows), for one forward with
    ``inputs.model_kwargs()`` updated by ``overrides`` (e.g. other ``pixel_values``)."""
    lm = language_model
    if lm is None:
        inner = getattr(model, "model", model)
        lm = getattr(inner, "language_model", None) or getattr(model, "language_model", None)
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds", args[0] if args else None)

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{**inputs.model_kwargs(), **overrides}, use_cache=False)
    finally:
        handle.remove()
    return seen["embeds"][0, inputs.image_positions.cpu()].detach()


def changed_rows(before: torch.Tensor, after: torch.Tensor, rtol: float = 1e-9) -> list[int]:
    """Indices of the rows of ``[K, ...]`` tensors that differ by more than ``rtol`` of the largest value."""
    diff = (after.double() - before.double()).abs().flatten(1).amax(1)
    scale = max(float(before.double().abs().max()), 1e-300)
    return torch.nonzero(diff > rtol * scale).flatten().tolist()


def vision_attention_modules(vision_tower) -> list:
    """The innermost modules of ``vision_tower`` whose class name ends in ``Attention``, in definition order."""
    found = [m for m in vision_tower.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in found if not any(type(c).__name__.endswith("Attention") for c in m.modules() if c is not m)]


def full_matrix_vision_query_to_patch(model, vision_tower, inputs, patch_tokens: torch.Tensor) -> torch.Tensor:
    """``[T, M, N]`` float64 Query-to-Patch through the vision tower by the definition, as slowly as it reads.

    One eager forward with hooks keeping every vision attention's probabilities ``[B, H, n, n]`` (a batch is the
    image's views); per target token t the gradient of its raw logit w.r.t. them, ``cam = mean_h (G ⊙ A)+`` per
    example, ``R_b = (I + cam_L) ⋯ (I + cam_1)`` per example, placed block-diagonally (example after example),
    ``R̄ = (R - I) / rowsum(R - I) + I`` (a zero row divided by 1), and ``layout Q2P · R̄[patch_tokens][:,
    patch_tokens]``. ``patch_tokens`` (each layout patch's tower token) is checked separately, by
    :func:`patches_of_vision_token`."""
    modules = vision_attention_modules(vision_tower)
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out[1])) for m in modules]
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        with _attention_to_eager(model), torch.enable_grad():
            out = model(**inputs.model_kwargs(), use_cache=False)
            if not seen or any(a is None for a in seen):
                raise AssertionError("the vision tower returned no attention probabilities in eager mode")
            q2p = inputs.layout.query_to_patch.double()
            tok = patch_tokens.cpu()
            maps = []
            for pos, target in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
                grads = torch.autograd.grad(out.logits[0, pos, target], seen, retain_graph=True, allow_unused=True)
                batch, n = seen[0].shape[0], seen[0].shape[-1]
                blocks = []
                for b in range(batch):
                    R = torch.eye(n, dtype=torch.float64)
                    for a, g in zip(seen, grads):
                        if g is not None:
                            R = R + (g[b].double() * a[b].detach().double()).clamp(min=0).mean(0) @ R
                    blocks.append(R)
                R = torch.block_diag(*blocks)
                eye = torch.eye(R.shape[0], dtype=torch.float64)
                sums = (R - eye).sum(1, keepdim=True)
                R_bar = (R - eye) / torch.where(sums == 0, torch.ones_like(sums), sums) + eye
                maps.append(q2p @ R_bar[tok][:, tok])
    finally:
        for h in handles:
            h.remove()
    return torch.stack(maps)


def patches_of_vision_token(model, last_attention, inputs, example: int, token: int,
                            language_model=None) -> list[int]:
    """The LLM image tokens (indices into the layout's positions) that change when the output of the vision
    tower's last used attention module is perturbed at ``(example, token)``: after it only token-wise layers and the
    connector act, so these are the tokens whose Query-to-Patch row reads that tower token's patch."""
    before = llm_image_embeddings(model, inputs, language_model)

    def bump(module, args, out):
        hidden = out[0].clone()
        # Not a constant: a LayerNorm after the residual would remove a shift shared by every channel.
        hidden[example, token] += torch.linspace(-1.0, 2.0, hidden.shape[-1], dtype=hidden.dtype)
        return (hidden, *out[1:])

    handle = last_attention.register_forward_hook(bump)
    try:
        after = llm_image_embeddings(model, inputs, language_model)
    finally:
        handle.remove()
    return changed_rows(before, after)

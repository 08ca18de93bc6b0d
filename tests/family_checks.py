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

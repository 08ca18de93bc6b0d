"""``q2p_rule="gradient"``: the gradient rule split within a structural Query-to-Patch map (rgae/methods/rgae.py,
``StructuralGradientSplit``), against a slow per-query autograd reference in float64 written from the definition:

``Q2P_t[q, p] = (x_p · (J_qᵀ g_q)_p)+ / Σ_p' (...)+`` with ``y_q`` the LLM's input embedding at image position q,
``g_q = ∂logit_t/∂y_q`` and ``x`` the connector's input patch features, one vector-Jacobian product per query.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae import RGAE
from rgae.methods.rgae import disjoint_query_groups
from tests.families.block_checks import ConnectorInput, edit_connector_input, language_model_of
from tests.family_checks import assert_close_relative


def reference_gradient_split(model, inputs, spec: ConnectorInput,
                             patch_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, M, N]`` float64: per target token and image token, the positive gradient × input of each connector
    input patch through that token's LLM input embedding alone, rows normalized to sum 1 (0 without positives).
    ``patch_rows [N]``: the row of the connector's input ``[R, C]`` that holds each layout patch (default: the
    patches of every view in order, after its ``spec.prefix`` rows)."""
    layout = inputs.layout
    seen = {}

    def leaf(x):
        seen["x"] = x.detach().requires_grad_(True)
        return seen["x"]

    def grab(module, args, kwargs):
        seen["y"] = kwargs.get("inputs_embeds", args[0] if args else None)

    handle = language_model_of(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.enable_grad(), edit_connector_input(spec, leaf):
            logits = model(**inputs.model_kwargs(), use_cache=False).logits
    finally:
        handle.remove()
    x, y = seen["x"], seen["y"]
    maps = []
    for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        (g,) = torch.autograd.grad(logits[0, pos, tok], y, retain_graph=True)
        rows = []
        for q in layout.positions.tolist():
            (vj,) = torch.autograd.grad(y[0, q], x, grad_outputs=g[0, q], retain_graph=True, allow_unused=True)
            vj = torch.zeros_like(x) if vj is None else vj
            per_row = (vj * x.detach()).sum(-1)
            rows.append((per_row[:, spec.prefix:].flatten() if patch_rows is None
                         else per_row.flatten()[patch_rows]).double())
        contrib = torch.stack(rows).clamp(min=0)
        total = contrib.sum(1, keepdim=True)
        maps.append(contrib / torch.where(total > 0, total, torch.ones_like(total)))
    return torch.stack(maps)


def check_against_reference(explainer, inputs, spec: ConnectorInput, patch_rows: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """The split equals the reference per target token, stays inside the structural support, its rows sum to 1
    (or 0: placeholders, tokens without positive contributions), and Text-to-Patch composes per token."""
    result = explainer.compute(inputs, q2p_rule="gradient")
    per_token = result["query_to_patch_per_token"]
    layout = inputs.layout
    expected = reference_gradient_split(explainer.model, inputs, spec, patch_rows)
    assert per_token.shape == expected.shape == (inputs.target_ids.numel(), layout.n_tokens, layout.n_patches)
    assert_close_relative(per_token, expected, 1e-9)
    support = layout.query_to_patch != 0
    assert not bool((per_token != 0)[:, ~support].any()), "mass outside the structural support"
    sums = per_token.sum(-1)
    assert bool((((sums - 1).abs() < 1e-12) | (sums == 0)).all())
    assert not bool(sums[:, layout.placeholder].any())
    # Non-degenerate: the split differs from the uniform structural rows.
    assert float((per_token - layout.query_to_patch.to(per_token)).abs().max()) > 1e-3
    torch.testing.assert_close(result["text_to_patch"],
                               torch.einsum("tm,tmn->tn", result["text_to_query"], per_token))
    return per_token


def test_internvl_split_equals_the_per_query_reference():
    from tests.families.tiny_internvl import tiny_image, tiny_internvl

    model, processor = tiny_internvl()
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(tiny_image(24, 40), "a red circle", None)  # 1×2 tiles + thumbnail
    # The reference differentiates the vision tower's output (CLS first), before the model's pixel shuffle: it
    # checks the adapter's mapping of the projector's concatenated channels to patches, too.
    check_against_reference(explainer, inputs, ConnectorInput(model.model.vision_tower, where="output", prefix=1))


def test_idefics3_split_equals_the_per_query_reference():
    from tests.families.tiny_idefics3 import tiny_idefics3, tiny_image

    model, processor = tiny_idefics3()
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(tiny_image(24, 40), "a red circle", None)
    assert bool(inputs.layout.placeholder.any())  # <row_r_col_c> / <global-img> tags
    check_against_reference(explainer, inputs, ConnectorInput(model.model.connector, where="input"))


@pytest.mark.parametrize("family", ["aya_vision", "mistral3"])
def test_aya_vision_and_mistral3_splits_equal_the_per_query_reference(family):
    import importlib

    tiny = importlib.import_module(f"tests.families.tiny_{family}")
    model, processor = getattr(tiny, f"tiny_{family}")(text_layers=1)
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(tiny.tiny_image(24, 40), "a red", None)
    check_against_reference(explainer, inputs, ConnectorInput(model.model.multi_modal_projector, where="input"))


def test_overlapping_bilinear_supports_split_in_several_groups():
    from tests.families.tiny_llava_onevision import tiny_llava_onevision, tiny_llava_onevision_processor
    from tests.tiny import tiny_image

    explainer = RGAE(tiny_llava_onevision(dtype=torch.float64), tiny_llava_onevision_processor())
    # 50×96: the unpadded tile grid is interpolated by a non-integer factor, so neighbouring tokens share patches.
    inputs = explainer.prepare(tiny_image(50, 96), "a red", None)
    assert inputs.layout.rule == "bilinear"
    assert len(disjoint_query_groups(inputs.layout.query_to_patch != 0)) > 1
    model = explainer.model
    check_against_reference(explainer, inputs, ConnectorInput(model.model.multi_modal_projector, where="input"))


def test_through_vision_composes_the_split_with_the_towers_relevance():
    """``Q2P_t = split_t · R̄_vit,t[patch tokens][:, patch tokens]``, R̄_vit from the float64 full-matrix oracle over
    the tower's eager probabilities (given the identity as the layout's map, the oracle returns R̄ itself)."""
    import dataclasses

    from tests.families.tiny_internvl import tiny_image, tiny_internvl
    from tests.family_checks import full_matrix_vision_query_to_patch

    model, processor = tiny_internvl(text_layers=1)
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(tiny_image(24, 40), "a red", None)
    ad = explainer.adapter
    tokens = ad.patch_tokens(inputs.layout)
    split = explainer.compute(inputs, q2p_rule="gradient")["query_to_patch_per_token"]
    through = explainer.compute(inputs, q2p_rule="gradient", through_vision=True)
    eye = SimpleNamespace(query_to_patch=torch.eye(inputs.layout.n_patches, dtype=torch.float64))
    r_bar = full_matrix_vision_query_to_patch(model, ad.vision_tower, dataclasses.replace(inputs, layout=eye), tokens)
    expected = torch.einsum("tmn,tnk->tmk", split.double(), r_bar)
    assert_close_relative(through["query_to_patch_per_token"], expected, 1e-6)
    assert not torch.allclose(through["query_to_patch_per_token"].double(), split.double())


def test_the_structural_rule_stays_the_default_and_options_say_which_ran():
    from tests.families.tiny_internvl import tiny_image, tiny_internvl

    model, processor = tiny_internvl(text_layers=1)
    explainer = RGAE(model, processor)
    default = explainer.attribute(tiny_image(24, 40), target="a red")
    assert default.options["query_to_patch_rule"] == "block" and default.options["q2p_rule"] == "structural"
    torch.testing.assert_close(default.query_to_patch, default.layout.query_to_patch.to(default.query_to_patch))
    split = explainer.attribute(tiny_image(24, 40), target="a red", q2p_rule="gradient")
    assert split.options["query_to_patch_rule"] == "gradient within block (mean over target tokens)"
    assert split.options["q2p_rule"] == "gradient"
    torch.testing.assert_close(split.text_to_query, default.text_to_query)
    eager = explainer.attribute(tiny_image(24, 40), target="a red", q2p_rule="gradient", capture="eager")
    torch.testing.assert_close(eager.query_to_patch, split.query_to_patch)
    with pytest.raises(ValueError, match="q2p_rule must be one of"):
        explainer.attribute(tiny_image(24, 40), target="a red", q2p_rule="blocks")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_disjoint_query_groups_cover_every_query_once_without_shared_patches(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    support = torch.rand(m, n, generator=gen) < 0.3
    groups = disjoint_query_groups(support)
    queries = sorted(q for g in groups for q in g.tolist())
    assert queries == support.any(1).nonzero().flatten().tolist()
    for g in groups:
        assert bool((support[g].sum(0) <= 1).all())

"""``through_vision=True`` for every family with a structural Query-to-Patch rule, tiles and views included: the vision
tower's relevance (one block-diagonal layer over a batch of views, or over a packed sequence) composed with the
layout's rule, ``Q2P_t = Q2P · R̄_vit[patch tokens][:, patch tokens]``, against a float64 full-matrix oracle over the
tower's eager probabilities (tests/family_checks.py), with both captures; and the map from layout patches to tower
tokens (``ModelAdapter.patch_tokens``) against the model: perturbing the tower's last attention output at one token
changes exactly the LLM image tokens whose Query-to-Patch row reads that token's patch."""

from __future__ import annotations

import pytest
import torch

from rgae import RGAE
from tests.families.layout_probes import noise_image
from tests.family_checks import assert_close_relative, full_matrix_vision_query_to_patch, patches_of_vision_token


def _llava_next():
    from tests.families.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor

    return tiny_llava_next(dtype=torch.float64), tiny_llava_next_processor(), (40, 88)


def _llava_onevision():
    from tests.families.tiny_llava_onevision import tiny_llava_onevision, tiny_llava_onevision_processor

    return tiny_llava_onevision(dtype=torch.float64), tiny_llava_onevision_processor(), (72, 100)  # bilinear


def _gemma3_pan_and_scan():
    from tests.families.tiny_gemma3 import tiny_gemma3, tiny_gemma3_processor

    return tiny_gemma3(dtype=torch.float64), tiny_gemma3_processor(pan_and_scan=True), (48, 80)


def _internvl():
    from tests.families.tiny_internvl import tiny_internvl

    return (*tiny_internvl(), (24, 40))


def _aya_vision():
    from tests.families.tiny_aya_vision import tiny_aya_vision

    return (*tiny_aya_vision(), (24, 40))


def _idefics3():
    from tests.families.tiny_idefics3 import tiny_idefics3

    return (*tiny_idefics3(), (24, 64))


def _mistral3():
    from tests.families.tiny_mistral3 import tiny_mistral3

    return (*tiny_mistral3(), (24, 40))


CASES = {
    "llava_next": _llava_next,  # base + anyres tiles, identity
    "llava_onevision": _llava_onevision,  # base + tiles, bilinear
    "gemma3_pan_and_scan": _gemma3_pan_and_scan,  # image + crops, pooling
    "internvl": _internvl,  # tiles + thumbnail, block (CLS dropped)
    "aya_vision": _aya_vision,  # tiles + global, block
    "idefics3": _idefics3,  # tiles + global, block
    "mistral3": _mistral3,  # one packed sequence, block
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, processor, hw = CASES[request.param]()
    model = model.double()
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(noise_image(hw, 0), "a red circle", None)
    return request.param, explainer, inputs


def test_case_has_the_layout_it_is_meant_to_cover(case):
    name, explainer, inputs = case
    layout = inputs.layout
    expected_rule = {"llava_next": "identity", "llava_onevision": "bilinear", "gemma3_pan_and_scan": "pooling"}
    assert layout.rule == expected_rule.get(name, "block")
    assert len(layout.views) > 1 or name == "mistral3"


@pytest.mark.parametrize("capture", ["interface", "eager"])
def test_query_to_patch_through_the_tower_equals_the_full_matrix_oracle(case, capture):
    _, explainer, inputs = case
    ad = explainer.adapter
    out = explainer.compute(inputs, through_vision=True, capture=capture)
    oracle = full_matrix_vision_query_to_patch(explainer.model, ad.vision_tower, inputs,
                                               ad.patch_tokens(inputs.layout))
    per_token = out["query_to_patch_per_token"]
    assert per_token is not None and per_token.shape == oracle.shape
    assert_close_relative(per_token, oracle, 1e-6)
    t2p = torch.einsum("tm,tmn->tn", out["text_to_query"].double(), oracle)
    assert_close_relative(out["text_to_patch"], t2p, 1e-6)
    # The tower moved relevance: not the structural rule alone.
    assert not torch.allclose(per_token[0].double(), inputs.layout.query_to_patch.double())


def test_patch_tokens_are_the_towers_tokens(case):
    _, explainer, inputs = case
    ad = explainer.adapter
    tokens = ad.patch_tokens(inputs.layout)
    assert tokens.numel() == inputs.layout.n_patches and len(set(tokens.tolist())) == tokens.numel()
    last = ad.vision_attention[ad.num_vision_layers_used - 1]
    seen = {}

    def shape(module, args, out):
        seen["shape"] = tuple(out[0].shape)

    handle = last.register_forward_hook(shape)
    try:
        with torch.no_grad():
            explainer.model(**inputs.model_kwargs(), use_cache=False)
    finally:
        handle.remove()
    batch, n_seq = seen["shape"][:2]
    q2p = inputs.layout.query_to_patch
    picks = torch.linspace(0, tokens.numel() - 1, 7).round().long().tolist()
    flat = [int(tokens[p]) for p in picks] + [t for t in range(batch * n_seq) if t not in set(tokens.tolist())][:1]
    for t in flat:
        expected = []
        if t in tokens.tolist():
            p = tokens.tolist().index(t)
            expected = torch.nonzero(q2p[:, p]).flatten().tolist()
        assert patches_of_vision_token(explainer.model, last, inputs, t // n_seq, t % n_seq,
                                       ad.language_model) == expected, t

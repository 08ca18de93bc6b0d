"""BLIP-2 (OPT) and InstructBLIP (Vicuna/Llama): the Q-Former in the wild, explained end to end on tiny random
instances of the real transformers classes with their real processors (tests/families/tiny_blip2.py).

Checked here against references written out in this file (plain torch, float64, none of rgae's engine):
Text-to-Query against the full-matrix LLM oracle; the Q-Former's Query-to-Patch against a GAE oracle over its self-
and cross-attention (with InstructBLIP's instruction tokens in the self-attention stream, and with the ViT propagated
for ``through_vision=True``); Text-to-Patch = Text-to-Query · Query-to-Patch without the CLS column, whose share is
reported; the layout against the model (pixels of one patch's box → that patch's embedding only; a change at one
Q-Former input patch → exactly the LLM's image positions); a planted model whose evidence is one known region.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_checks import assert_close_relative, changed_rows, full_matrix_text_to_query
from gae_oracle import cam, normalize, recorded_forward
from tiny_blip2 import tiny_blip2, tiny_image, tiny_instructblip

from rgae import Explanation
from rgae.adapters import families, get_adapter
from rgae.methods import RGAE, AttentionRollout, GradCAM, Occlusion, RawAttention

BUILDERS = {"blip2": tiny_blip2, "instructblip": tiny_instructblip}
TARGET = "red circle on the left"


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    model, processor = BUILDERS[request.param]()
    return request.param, model, processor


# ---- independent references ---------------------------------------------------------------------------------------
def qformer_layers(model) -> tuple[list[str], list[torch.nn.Module]]:
    """The Q-Former's attention modules in forward order and their kinds, read off the model here."""
    kinds, modules = [], []
    for layer in model.qformer.encoder.layer:
        kinds.append("self")
        modules.append(layer.attention.attention)
        if layer.has_cross_attention:
            kinds.append("cross")
            modules.append(layer.crossattention.attention)
    return kinds, modules


def qformer_oracle(model, inputs, through_vision: bool = False, queries_only: bool = False) -> list[torch.Tensor]:
    """Per target token, ``[M, 1 + N]`` R_qk of the Q-Former by GAE, written out: the stream is whatever the
    Q-Former's self-attention covers (InstructBLIP: queries + instruction tokens); a cross-attention layer's map
    covers the queries (its first rows); ``R_ss += cam·R_ss``, ``R_sk += cam·R_sk`` for self-attention,
    ``R_sk += R̄_ssᵀ·cam·R̄_kk`` for cross-attention (R_kk = I, or the ViT's ``(I + cam_L)…(I + cam_1)``).

    ``queries_only=True`` is the wrong rule, for contrast: every self-attention map cut to the query block."""
    kinds, modules = qformer_layers(model)
    vision = [layer.self_attn for layer in model.vision_model.encoder.layers]
    logits, seen = recorded_forward(model, inputs, modules + vision)
    m = model.config.num_query_tokens
    out = []
    for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        grads = torch.autograd.grad(logits[0, pos, tok], seen, retain_graph=True, allow_unused=True)
        cams = [cam(a, g) for a, g in zip(seen, grads)]
        q_cams, v_cams = cams[: len(modules)], cams[len(modules) :]
        if queries_only:
            q_cams = [c[:m, :m] if k == "self" else c for k, c in zip(kinds, q_cams)]
        n_s = max(c.shape[0] for k, c in zip(kinds, q_cams) if k == "self")
        n_k = next(c.shape[1] for k, c in zip(kinds, q_cams) if k == "cross")
        R_kk = torch.eye(n_k, dtype=torch.float64)
        if through_vision:
            for c in v_cams:
                R_kk = R_kk + c @ R_kk
        R_ss, R_sk = torch.eye(n_s, dtype=torch.float64), torch.zeros(n_s, n_k, dtype=torch.float64)
        for kind, c in zip(kinds, q_cams):
            if kind == "self":
                R_ss, R_sk = R_ss + c @ R_ss, R_sk + c @ R_sk
            else:
                full = torch.zeros(n_s, n_k, dtype=torch.float64)
                full[: c.shape[0]] = c
                R_sk = R_sk + normalize(R_ss).T @ full @ normalize(R_kk)
        out.append(R_sk[:m])
    return out


# ---- the adapter ----------------------------------------------------------------------------------------------
def test_families_are_listed_and_found(family):
    name, model, _ = family
    assert name in [f.name for f in families()]
    ad = get_adapter(model)
    assert ad.projector_kind == "qformer"
    assert (ad.vision_prefix, ad.feature_prefix, ad.n_queries) == (1, 1, model.config.num_query_tokens)
    assert ad.patch_grid == (4, 4)
    kinds = [k for k, _ in ad.projector_attention]
    assert kinds == ["self", "cross"] * len(model.qformer.encoder.layer)
    assert ad.projector_type.endswith(f"{len(model.qformer.encoder.layer)}_{model.config.num_query_tokens}")


def test_cross_attention_frequency_two_lists_every_other_cross():
    model, _ = tiny_blip2(qformer_layers=4, cross_attention_frequency=2)
    kinds = [k for k, _ in get_adapter(model).projector_attention]
    assert kinds == ["self", "cross", "self", "self", "cross", "self"]


def test_flan_t5_language_model_is_refused_with_the_reason():
    model, _ = tiny_blip2(text="t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_adapter(model)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prompt_without_chat_template_is_the_family_format(name):
    model, processor = BUILDERS[name](chat_template=False)
    inputs = RGAE(model, processor).prepare(tiny_image(), TARGET, "what color is the circle ?")
    expected = {"blip2": "Question: what color is the circle ? Answer:", "instructblip": "what color is the circle ?"}
    assert inputs.prompt == expected[name]
    # The processor put exactly M image tokens in front (before BOS); the layout found them there.
    assert inputs.layout.positions.tolist() == list(range(model.config.num_query_tokens))
    assert int(inputs.input_ids[0, model.config.num_query_tokens]) == processor.tokenizer.bos_token_id


# ---- exactness --------------------------------------------------------------------------------------------------
def test_text_to_query_equals_full_matrix_oracle(family):
    _, model, processor = family
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)
    fast = ex.compute(inputs)["text_to_query"]
    assert_close_relative(fast, full_matrix_text_to_query(model, inputs), 1e-6)
    # Several target tokens per backward pass (vmap over the Q-Former's backward too): the same maps.
    batched = ex.compute(inputs, grad_batch=3)
    assert_close_relative(batched["text_to_query"], fast, 1e-12)


@pytest.mark.parametrize("through_vision", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_query_to_patch_and_text_to_patch_equal_qformer_oracle(family, through_vision):
    _, model, processor = family
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)
    result = ex.compute(inputs, through_vision=through_vision)
    oracle = qformer_oracle(model, inputs, through_vision=through_vision)
    t2q = full_matrix_text_to_query(model, inputs)
    per_token = result["query_to_patch_per_token"]
    for t, r_qk in enumerate(oracle):
        assert_close_relative(per_token[t], r_qk[:, 1:], 1e-6)
        # Text-to-Patch drops the CLS column; its share of T2Q · R_qk is reported.
        assert_close_relative(result["text_to_patch"][t], t2q[t] @ r_qk[:, 1:], 1e-6)
        full = t2q[t] @ r_qk
        assert abs(float(result["non_patch_share"][t]) - float(full[0] / full.sum())) < 1e-9
    assert_close_relative(result["query_to_patch"], torch.stack(oracle)[:, :, 1:].mean(0), 1e-6)


@pytest.mark.slow
def test_instruction_tokens_are_part_of_the_qformer_stream():
    """InstructBLIP's self-attention runs over queries + instruction tokens; leaving the instruction tokens out of
    the stream (a queries-only GAE over the same maps) gives a different map, so the oracle above can tell."""
    model, processor = tiny_instructblip(qformer_layers=3)
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)
    n_instr = inputs.extra["qformer_input_ids"].shape[1]
    m = model.config.num_query_tokens
    kinds, modules = qformer_layers(model)
    _, seen = recorded_forward(model, inputs, modules, grad=False)
    assert {tuple(a.shape[-2:]) for k, a in zip(kinds, seen) if k == "self"} == {(m + n_instr, m + n_instr)}
    assert {tuple(a.shape[-2:]) for k, a in zip(kinds, seen) if k == "cross"} == {(m, 17)}
    result = ex.compute(inputs)["query_to_patch_per_token"]
    oracle = qformer_oracle(model, inputs)
    cut = qformer_oracle(model, inputs, queries_only=True)
    for t in range(len(oracle)):
        assert_close_relative(result[t], oracle[t][:, 1:], 1e-6)
        assert float((cut[t] - oracle[t]).abs().max()) > 1e-3 * float(oracle[t].abs().max())


def test_cross_attention_every_other_layer_matches_oracle():
    """BLIP-2's real checkpoints cross-attend every second layer."""
    model, processor = tiny_blip2(qformer_layers=3, cross_attention_frequency=2)
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)
    result = ex.compute(inputs)
    for t, r_qk in enumerate(qformer_oracle(model, inputs)):
        assert_close_relative(result["query_to_patch_per_token"][t], r_qk[:, 1:], 1e-6)


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_teacher_forced_image_map_and_figures(family, tmp_path):
    from rgae.viz import save_figures

    name, model, processor = family
    image = tiny_image(24, 40)
    e = RGAE(model, processor).attribute(image, target=TARGET)
    n = model.config.num_query_tokens
    assert e.text_to_query.shape == (len(e.output_tokens), n)
    assert e.text_to_patch.shape == (len(e.output_tokens), 16)
    assert e.layout.rule == "qformer_gae" and e.layout.query_to_patch is None
    assert e.options["query_to_patch_rule"] == "qformer_gae (mean over target tokens)"
    assert len(e.options["non_patch_share"]) == len(e.output_tokens)
    assert all(0.0 <= s <= 1.0 for s in e.options["non_patch_share"])
    assert tuple(e.image_map().shape) == (24, 40)
    assert tuple(e.image_map(word="circle").shape) == (24, 40)
    assert float(e.image_map().sum()) > 0
    paths = save_figures(e, tmp_path / name, dpi=30, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)
    again = Explanation.load(e.save(tmp_path / f"{name}-explanation"))
    assert torch.equal(again.image_map(), e.image_map()) and again.options == e.options


def test_end_to_end_generated_target(family):
    """target=None explains the model's greedy answer: its tokens are the argmax of the teacher-forced logits at
    their predicting positions (the generated text lines up with the prompt it was generated from)."""
    _, model, processor = family
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), None, None, max_new_tokens=3)
    with torch.no_grad():
        logits = model(**inputs.model_kwargs(), use_cache=False).logits
    assert logits[0, inputs.predicting_positions].argmax(-1).tolist() == inputs.target_ids.tolist()
    e = ex._attribute(inputs)
    assert e.text_to_patch.shape[0] == inputs.target_ids.numel()


@pytest.mark.parametrize("method", [RawAttention, AttentionRollout])
def test_baselines_read_the_last_cross_attention(family, method):
    _, model, processor = family
    ex = method(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)
    last_cross = [mod for k, mod in ex.adapter.projector_attention if k == "cross"][-1]
    _, seen = recorded_forward(model, inputs, [last_cross], grad=False)
    e = ex._attribute(inputs)
    expected = seen[0][0].mean(0)[:, 1:]  # head mean, CLS column dropped
    assert torch.allclose(e.query_to_patch, expected, rtol=0, atol=1e-12)
    assert torch.allclose(e.text_to_patch, e.text_to_query @ expected, rtol=0, atol=1e-12)


# ---- the layout against the model ---------------------------------------------------------------------------------
def _patch_embeddings(model, processor, image) -> torch.Tensor:
    out = {}
    handle = model.vision_model.embeddings.patch_embedding.register_forward_hook(
        lambda mod, args, y: out.setdefault("y", y.detach()))
    try:
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"].to(model.dtype)
        with torch.no_grad():
            model.vision_model(pixel_values=pixels)
    finally:
        handle.remove()
    return out["y"][0].flatten(1).T  # [N, D], row-major over the grid


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_pixels_of_one_patch_box_change_only_that_patch(family, hw):
    """Perturb the pixels of one patch's box in the ORIGINAL image, away from its edges by what the bicubic filter
    reaches (2 px when 24 → 32 rows, 2.5 px when 40 → 32 columns; so the box's inner pixels from 2 px in): exactly
    that patch's embedding changes."""
    _, model, processor = family
    ex = RGAE(model, processor)
    image = tiny_image(*hw, seed=1)
    layout = ex.prepare(image, TARGET, None).layout
    before = _patch_embeddings(model, processor, image)
    boxes = layout.patch_boxes()
    for p in (0, 6, 13):
        x0, y0, x1, y1 = boxes[p].tolist()
        margin = 0 if hw == (32, 32) else 2
        ys, xs = slice(int(y0) + margin, int(np.ceil(y1)) - margin), slice(int(x0) + margin, int(np.ceil(x1)) - margin)
        bumped = image.copy()
        bumped[ys, xs] = 255 - bumped[ys, xs]
        assert changed_rows(before, _patch_embeddings(model, processor, bumped)) == [p]


def test_change_at_one_qformer_input_changes_exactly_the_image_positions(family):
    """A unit change at one Q-Former input patch (the vision model's output row of patch p) reaches the LLM exactly
    at the layout's image positions (every query reads every patch), and nowhere in the text."""
    _, model, processor = family
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(), TARGET, None)

    def embeds(patch=None):
        seen = {}

        def bump(mod, args, out):
            if patch is not None:
                out.last_hidden_state = out.last_hidden_state.clone()
                out.last_hidden_state[0, 1 + patch, 0] += 1.0
            return out

        def grab(mod, args, kwargs):
            seen["e"] = kwargs["inputs_embeds"].detach()

        h1 = model.vision_model.register_forward_hook(bump)
        h2 = model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs.model_kwargs(), use_cache=False)
        finally:
            h1.remove()
            h2.remove()
        return seen["e"][0]

    base = embeds()
    for p in (0, 15):
        assert changed_rows(base, embeds(p)) == inputs.layout.positions.tolist()


# ---- planted evidence ----------------------------------------------------------------------------------------------
def planted_model(builder):
    """A model whose image evidence is exactly the bright patches: no position embeddings, no CLS content, no
    vision residual branches (vision features = post-layernorm(patch embedding), 0 for a black patch), no Q-Former
    value bias (a black patch's value vector is 0), processor mean 0 / std 1. Every Q-Former query reads values
    only from bright patches, so d(target)/dA is zero on black patches' columns."""
    model, processor = builder(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    with torch.no_grad():
        emb = model.vision_model.embeddings
        emb.position_embedding.zero_()
        emb.class_embedding.zero_()
        emb.patch_embedding.bias.zero_()
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.projection.weight.zero_()
            layer.self_attn.projection.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
        for layer in model.qformer.encoder.layer:
            if layer.has_cross_attention:
                layer.crossattention.attention.value.bias.zero_()
    return model, processor


@pytest.mark.slow
@pytest.mark.parametrize("name, cell", [("blip2", (0, 3)), ("instructblip", (2, 1))])
def test_planted_region_lights_up(name, cell):
    model, processor = planted_model(BUILDERS[name])
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    r, c = cell
    image[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 255
    e = RGAE(model, processor).attribute(image, target=TARGET)
    heat = e.image_map()
    inside = heat[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].sum()
    assert float(heat.sum()) > 0
    assert float(inside / heat.sum()) > 1 - 1e-9
    y, x = divmod(int(heat.argmax()), heat.shape[1])  # the pointing point
    assert 8 * r <= y < 8 * r + 8 and 8 * c <= x < 8 * c + 8
    # Grad-CAM (on the Q-Former's input features, uncentered: the off-region features are zero) and occlusion see
    # the same evidence: nothing off the region.
    off = torch.ones(16, dtype=torch.bool)
    off[4 * r + c] = False
    for method, kw in ((GradCAM, {"center": False}), (Occlusion, {"backend": "torch"})):
        other = method(model, processor).attribute(image, target=TARGET, **kw).text_to_patch
        assert other.shape == e.text_to_patch.shape
        assert float(other[:, off].abs().max()) <= 1e-12 * max(float(other.abs().max()), 1e-300)
        assert float(other[:, ~off].abs().max()) > 0
    # Centered (the default), every feature differs from the mean, so off-region patches get some of the weight;
    # the planted patch stays the top one of the sentence map.
    centered = GradCAM(model, processor).attribute(image, target=TARGET).text_to_patch
    assert int(centered.sum(0).argmax()) == 4 * r + c

"""The projector zoo: shapes on square/odd/rectangular grids, parameter layouts that published checkpoints load into,
hand-computed pooling, gradients, Q-Former attention capture, BLIP-2 initialisation, spec errors, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deco_models import build_projector, parse_projector_spec
from deco_models.projectors import (
    PROJECTOR_KINDS,
    ProjectorSpec,
    available_projectors,
    llava_sequential_to_named,
    load_blip2_qformer_state_dict,
    register_projector,
    unregister_projector,
)
from deco_models.projectors.abstractor import deformable_sample

VISION, LLM = 32, 24
# Small options so every family stays fast on 2 CPU cores.
TINY = {
    "qformer": {"num_heads": 2},
    "cabstractor": {"hidden_size": 16, "depth": 1},
    "dabstractor": {"hidden_size": 16, "num_heads": 2, "ffn_size": 32},
}
COMPRESSING = ["avgpool2_{M}", "maxpool2_{M}", "qformer2_{M}", "cabstractor_{M}", "dabstractor_{M}"]
ALL_TEMPLATES = ["linear", "mlp2x_gelu", *COMPRESSING]


def make(spec: str, grid, vision=VISION, llm=LLM, **kwargs):
    kind = parse_projector_spec(spec).kind
    return build_projector(spec, vision, llm, grid, **{**TINY.get(kind, {}), **kwargs})


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("template", ALL_TEMPLATES)
@pytest.mark.parametrize(("grid", "m"), [((24, 24), 144), ((27, 27), 144), ((16, 24), 36)])
def test_output_shape_and_attributes(template, grid, m):
    spec = template.format(M=m)
    proj = make(spec, grid)
    n = grid[0] * grid[1]
    out = proj(torch.randn(2, n, VISION))
    compressing = "{M}" in template
    expected_m = m if compressing else n
    assert out.shape == (2, expected_m, LLM)
    assert proj.num_queries == expected_m
    assert proj.spec == spec
    assert proj.kind == parse_projector_spec(spec).kind and proj.kind in PROJECTOR_KINDS
    assert proj.grid_hw == grid
    side = math.isqrt(m)
    assert proj.query_grid == ((side, side) if compressing else grid)
    assert proj.query_to_patch in {"identity", "pooling", "qformer_gae", "gradient"}


def test_int_grid_means_square_and_bad_grids_raise():
    assert make("avgpool1_4", 4).grid_hw == (4, 4)
    for bad in [(0, 4), (4,), "4x4", 2.5, (4, 4, 4), True]:
        with pytest.raises(ValueError, match="grid_hw"):
            make("avgpool1_4", bad)


def test_wrong_input_shape_raises_naming_the_grid():
    proj = make("avgpool2_36", (16, 24))
    with pytest.raises(ValueError, match="384 patches"):
        proj(torch.randn(1, 385, VISION))
    with pytest.raises(ValueError, match="16x24"):
        proj(torch.randn(1, 384, VISION + 1))


# ----------------------------------------------------------------------------------------------- MLP / linear layout


def test_mlp2x_gelu_loads_a_transformers_llava_projector_directly():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=VISION, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=LLM, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=64),
    )  # fmt: skip
    reference = LlavaMultiModalProjector(config)
    proj = make("mlp2x_gelu", (4, 4))
    assert set(proj.state_dict()) == set(reference.state_dict())
    proj.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 16, VISION)
    torch.testing.assert_close(proj(x), reference(x), rtol=0, atol=0)


def test_mlp_depth_and_linear_names():
    assert [n for n, _ in make("linear", 3).named_children()] == ["linear_1"]
    assert [n for n, _ in make("mlp3x_gelu", 3).named_children()] == ["linear_1", "act", "linear_2", "linear_3"]
    assert parse_projector_spec("mlp3x_gelu").mlp_depth == 3


def test_original_llava_sequential_keys_rename_onto_mlp():
    sequential = nn.Sequential(nn.Linear(VISION, LLM), nn.GELU(), nn.Linear(LLM, LLM), nn.GELU(), nn.Linear(LLM, LLM))
    state = {f"model.mm_projector.{k}": v for k, v in sequential.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(3)
    proj = make("mlp3x_gelu", (2, 3))
    proj.load_state_dict(llava_sequential_to_named(state, prefix="model.mm_projector."), strict=True)
    x = torch.randn(1, 6, VISION)
    torch.testing.assert_close(proj(x), sequential(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- pooling


def slow_adaptive_pool(x: torch.Tensor, grid, out_hw, reduce) -> torch.Tensor:
    """[B, N, D] row-major -> [B, oh*ow, D] with PyTorch's windows [floor(i*In/Out), ceil((i+1)*In/Out)), by loops."""
    h, w = grid
    oh, ow = out_hw
    rows = []
    for i in range(oh):
        for j in range(ow):
            r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            idx = [r * w + c for r in range(r0, r1) for c in range(c0, c1)]
            rows.append(reduce(x[:, idx, :]))
    return torch.stack(rows, 1)


@pytest.mark.parametrize(("grid", "m"), [((27, 27), 144), ((16, 24), 36), ((5, 7), 9)])
@pytest.mark.parametrize("kind", ["avgpool", "maxpool"])
def test_pooling_equals_hand_computed_pool_then_mlp(kind, grid, m):
    proj = make(f"{kind}2_{m}", grid)
    x = torch.randn(2, grid[0] * grid[1], VISION, dtype=torch.float64)
    proj = proj.double()
    side = math.isqrt(m)
    reduce = (lambda t: t.mean(1)) if kind == "avgpool" else (lambda t: t.amax(1))
    pooled = slow_adaptive_pool(x, grid, (side, side), reduce)
    torch.testing.assert_close(proj.pool(x), pooled)
    lib = F.adaptive_avg_pool2d if kind == "avgpool" else F.adaptive_max_pool2d
    as_grid = x.transpose(1, 2).reshape(2, VISION, *grid)
    torch.testing.assert_close(pooled, lib(as_grid, side).flatten(2).transpose(1, 2))
    lin1, lin2 = proj.mlp_projector[0], proj.mlp_projector[2]
    by_hand = F.linear(F.gelu(F.linear(pooled, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    torch.testing.assert_close(proj(x), by_hand)


@pytest.mark.parametrize("kind", ["avgpool", "maxpool"])
def test_pooling_compressor_has_zero_parameters_and_deco_key_layout(kind):
    proj = make(f"{kind}2_144", (24, 24))
    assert n_params(proj.sampler) == 0
    assert n_params(proj) == n_params(proj.mlp_projector) == (VISION * LLM + LLM) + (LLM * LLM + LLM)
    # DeCo's released AvgPoolProjector/MaxPoolProjector state-dict keys.
    assert set(proj.state_dict()) == {f"mlp_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(make(f"{kind}3_16", 8).state_dict()) == {
        f"mlp_projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    }


# --------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_gradients_reach_every_parameter_and_the_input(template):
    proj = make(template.format(M=16), (6, 8))
    x = torch.randn(2, 48, VISION, requires_grad=True)
    proj(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in proj.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------------------------------- Q-Former


def test_qformer_queries_are_random_not_zero_and_distinct():
    proj = make("qformer2_16", (6, 6))
    queries = proj.query_tokens.detach()[0]
    assert queries.shape == (16, VISION)
    assert queries.abs().min() > 0
    assert 0.01 < queries.std() < 0.03
    assert torch.cdist(queries, queries).add(torch.eye(16)).min() > 0
    out = proj(torch.randn(1, 36, VISION))[0]
    assert torch.cdist(out, out).add(torch.eye(16)).min() > 1e-4  # distinct queries give distinct tokens


@pytest.mark.parametrize("frequency", [1, 2])
def test_qformer_attention_hooks_see_probabilities(frequency):
    proj = make("qformer3_16", (6, 8), cross_attention_frequency=frequency)
    layers = proj.attention_layers()
    expected = ["self", "cross"] * 3 if frequency == 1 else ["self", "cross", "self", "self", "cross"]
    assert [kind for kind, _ in layers] == expected
    assert {type(module).__name__ for _, module in layers} == {"Blip2QFormerMultiHeadAttention"}
    seen = []
    handles = [
        module.register_forward_hook(lambda mod, args, out, kind=kind: seen.append((kind, out[1])))
        for kind, module in layers
    ]
    x = torch.randn(2, 48, VISION, requires_grad=True)
    out = proj(x)
    for handle in handles:
        handle.remove()
    assert [kind for kind, _ in seen] == expected
    for kind, probs in seen:
        assert probs.shape == (2, 2, 16, 16 if kind == "self" else 48)
        assert probs.min() >= 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 16))
    # The captured probabilities carry the graph: R-GAE needs d(target)/dA.
    grads = torch.autograd.grad(out.sum(), [probs for _, probs in seen])
    assert all(g.abs().sum() > 0 for g in grads)


def test_qformer_stays_eager_even_if_a_parent_switches_attention():
    proj = make("qformer1_4", (3, 3))
    proj.qformer.config._attn_implementation = "sdpa"
    seen = []
    proj.attention_layers()[1][1].register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    proj(torch.randn(1, 9, VISION))
    assert seen[0] is not None and seen[0].shape == (1, 2, 4, 9)


def test_qformer_default_layout_matches_deco_llava_builder():
    proj = build_projector("qformer2_16", 64, 48, (6, 6))
    assert proj.width == 64 and proj.qformer.config.num_attention_heads == 2  # 32-dim heads
    assert proj.qformer.config.intermediate_size == 256 and proj.qformer_input_proj is None
    keys = set(proj.state_dict())
    assert {"query_tokens", "proj.0.weight", "proj.2.weight", "qformer.layernorm.weight"} <= keys
    assert "qformer.encoder.layer.1.crossattention.attention.key.weight" in keys
    with_input = build_projector("qformer2_16", 64, 48, (6, 6), encoder_width=40, width=32, out_depth=1)
    assert with_input.qformer_input_proj.weight.shape == (40, 64)
    assert with_input.qformer.encoder.layer[0].crossattention.attention.key.weight.shape == (32, 40)
    assert with_input(torch.randn(1, 36, 64)).shape == (1, 16, 48)


def _blip2_like_checkpoint(width=32, encoder=40, layers=3, queries=4):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * width,
        encoder_hidden_size=encoder, cross_attention_frequency=2, use_qformer_text_input=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = Blip2QFormerModel(config).eval()
    state = {f"qformer.{k}": v for k, v in model.state_dict().items()}
    state["query_tokens"] = torch.randn(1, queries, width)
    state["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2)
    return model, state


def test_blip2_state_dict_round_trip():
    model, state = _blip2_like_checkpoint()
    options = {"width": 32, "num_heads": 2, "intermediate_size": 64, "encoder_width": 40}
    proj = build_projector("qformer2_4", VISION, LLM, (3, 3), cross_attention_frequency=2, **options)
    report = load_blip2_qformer_state_dict(proj, state)
    assert "query_tokens" in report["loaded"]
    assert "vision_model.embeddings.patch_embedding.weight" in report["ignored"]
    assert any(".layer.2." in k for k in report["ignored"])  # BLIP-2 layers beyond L
    assert any(".intermediate.dense" in k for k in report["ignored"])  # text-only FFN
    torch.testing.assert_close(proj.query_tokens, state["query_tokens"], rtol=0, atol=0)
    # The loaded Q-Former computes what the first two BLIP-2 layers compute.
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    patches = torch.randn(2, 9, 40)
    queries = state["query_tokens"].expand(2, -1, -1)
    expected = model(query_embeds=queries, encoder_hidden_states=patches).last_hidden_state
    got = proj.qformer(query_embeds=queries, encoder_hidden_states=patches).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_blip2_state_dict_mismatches_raise_clear_errors():
    _, state = _blip2_like_checkpoint()
    wrong_width = build_projector("qformer2_4", VISION, LLM, (3, 3), width=64, encoder_width=40,
                                  cross_attention_frequency=2)  # fmt: skip
    with pytest.raises(ValueError, match="shape mismatches.*query.weight"):
        load_blip2_qformer_state_dict(wrong_width, state)
    every_layer = build_projector("qformer2_4", VISION, LLM, (3, 3), width=32, num_heads=2, intermediate_size=64,
                                  encoder_width=40)  # fmt: skip
    with pytest.raises(ValueError, match="missing tensors.*layer.1.crossattention"):
        load_blip2_qformer_state_dict(every_layer, state)
    more_queries = build_projector("qformer2_9", VISION, LLM, (3, 3), width=32, num_heads=2, intermediate_size=64,
                                   encoder_width=40, cross_attention_frequency=2)  # fmt: skip
    with pytest.raises(ValueError, match="load_query_tokens=False"):
        load_blip2_qformer_state_dict(more_queries, state)
    before = more_queries.query_tokens.detach().clone()
    load_blip2_qformer_state_dict(more_queries, state, load_query_tokens=False)
    torch.testing.assert_close(more_queries.query_tokens, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="QFormerProjector"):
        load_blip2_qformer_state_dict(make("avgpool1_4", 3), state)


# ------------------------------------------------------------------------------------------------- abstractors


def test_deformable_sample_hits_patch_centres_and_interpolates():
    h, w, d = 3, 4, 5
    value = torch.randn(1, h * w, 1, d, dtype=torch.float64)
    centres = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h] for i in range(h) for j in range(w)], dtype=torch.float64)
    weights = torch.ones(1, h * w, 1, 1, dtype=torch.float64)
    out = deformable_sample(value, (h, w), centres.view(1, h * w, 1, 1, 2), weights)
    torch.testing.assert_close(out, value[:, :, 0, :])
    # Halfway between patch (1, 1) and (1, 2), two points weighted 0.25 / 0.75: a hand-computable mix.
    mid = torch.tensor([[[[[2.0 / w, 1.5 / h], [1.5 / w, 1.5 / h]]]]], dtype=torch.float64)
    wts = torch.tensor([[[[0.25, 0.75]]]], dtype=torch.float64)
    got = deformable_sample(value, (h, w), mid, wts)[0, 0]
    v = value[0, :, 0, :]
    torch.testing.assert_close(got, 0.25 * (v[5] + v[6]) / 2 + 0.75 * v[5])


def test_dabstractor_reference_points_are_pool_cell_centres_row_major():
    proj = make("dabstractor_4", (4, 6))
    torch.testing.assert_close(proj.reference_points, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75],
                                                                    [0.75, 0.75]]))  # fmt: skip


def test_cabstractor_uses_honeybee_names():
    proj = make("cabstractor_4", (8, 8))
    keys = set(proj.state_dict())
    assert {"pos_emb", "net.0.b1.conv1.conv.weight", "net.0.b1.conv2.bn.weight", "net.0.b1.se.fc1.weight",
            "net.0.b1.downsample.conv.weight", "net.2.b1.conv3.conv.weight", "readout.0.weight"} <= keys  # fmt: skip
    # The 3x3 conv is depthwise (RegNet group size 1) and the second stage keeps the width: no shortcut conv.
    assert proj.net[0].b1.conv2.conv.groups == 16
    assert "net.2.b1.downsample.conv.weight" not in keys
    assert n_params(proj.net[1]) == 0


# ------------------------------------------------------------------------------------------------------- specs


def test_parse_specs():
    assert parse_projector_spec("avgpool2_144") == ProjectorSpec("avgpool2_144", "avgpool", 2, 144, 2)
    assert parse_projector_spec("qformer2_144") == ProjectorSpec("qformer2_144", "qformer", 2, 144, None)
    assert parse_projector_spec("linear") == ProjectorSpec("linear", "linear", 1, None, 1)
    assert parse_projector_spec("cabstractor_64").query_grid == (8, 8)
    assert parse_projector_spec("dabstractor_1").num_queries == 1
    assert available_projectors()[:2] == ["linear", "mlp{N}x_gelu"]
    with pytest.raises(dataclasses_frozen_error()):
        parse_projector_spec("linear").kind = "mlp"


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


FORMS = ["linear", "mlp{N}x_gelu", "avgpool{L}_{M}", "maxpool{L}_{M}", "qformer{L}_{M}", "cabstractor_{M}"]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("resampler_64", "unknown"),
        ("avgpool2", "malformed"),
        ("avgpool_144", "malformed"),
        ("mlp2x_relu", "malformed"),
        ("mlp0x_gelu", "malformed"),
        ("avgpool02_144", "malformed"),
        ("AvgPool2_144", "malformed"),
        (" avgpool2_144", "malformed"),
        ("qformer2_0", "malformed"),
        ("cabstractor144", "malformed"),
        ("avgpool2_143", "not a perfect square"),
        ("qformer2_50", "not a perfect square"),
        (None, "expected a string"),
    ],
)
def test_bad_specs_raise_value_error_listing_valid_forms(spec, why):
    with pytest.raises(ValueError, match=why) as info:
        parse_projector_spec(spec)
    for form in [*FORMS, "dabstractor_{M}"]:
        assert f"'{form}'" in str(info.value)


@pytest.mark.parametrize("spec", ["avgpool2_144", "qformer2_81", "cabstractor_100", "dabstractor_121"])
def test_more_queries_than_patches_raises(spec):
    with pytest.raises(ValueError, match="more than the 64 input patches") as info:
        build_projector(spec, VISION, LLM, (8, 8))
    assert "'avgpool{L}_{M}'" in str(info.value)
    with pytest.raises(ValueError, match="more than"):
        parse_projector_spec(spec, num_patches=64)


def test_register_custom_projector():
    @register_projector("identity{M}")
    def _build(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
        return nn.Identity()

    try:
        assert "identity{M}" in available_projectors()
        assert parse_projector_spec("identity4").kind == "identity"
        assert isinstance(build_projector("identity4", 4, 4, 2), nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_projector("identity{M}")(_build)
    finally:
        unregister_projector("identity{M}")
    assert "identity{M}" not in available_projectors()


# ------------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_determinism_and_state_dict_round_trip(template):
    spec = template.format(M=9)
    torch.manual_seed(3)
    a = make(spec, (5, 6))
    torch.manual_seed(3)
    b = make(spec, (5, 6))
    x = torch.randn(2, 30, VISION)
    a.eval()
    b.eval()
    out = a(x)
    torch.testing.assert_close(out, a(x), rtol=0, atol=0)
    torch.testing.assert_close(out, b(x), rtol=0, atol=0)
    torch.manual_seed(4)
    c = make(spec, (5, 6))
    c.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(c(x), out, rtol=0, atol=0)

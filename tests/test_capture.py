"""Attention capture: eager switching and restoring, explain mode, hooks, per-layer maps, adapters."""

from __future__ import annotations

import pytest
import torch
from test_reference import random_image, tiny_deco, tiny_llava

from rgae.adapters import get_adapter
from rgae.capture import AttentionCaptureError, AttentionRecorder, eager_attention, explain_mode
from rgae.methods import RGAE


def _impls(model):
    cfg = model.config
    return (cfg._attn_implementation, cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation)


def test_sdpa_model_is_switched_to_eager_and_restored():
    model, proc = tiny_llava(attn="sdpa")
    assert _impls(model) == ("sdpa",) * 3
    with eager_attention(model):
        assert _impls(model) == ("eager",) * 3
    assert _impls(model) == ("sdpa",) * 3
    eager_model, _ = tiny_llava(attn="eager")  # same seed, same weights
    a = RGAE(model, proc).attribute(random_image(), target="a red circle")
    b = RGAE(eager_model, proc).attribute(random_image(), target="a red circle")
    assert _impls(model) == ("sdpa",) * 3
    assert torch.allclose(a.text_to_patch, b.text_to_patch, atol=1e-12) and a.text_to_patch.abs().max() > 0


def test_sdpa_without_switch_is_a_clear_error_not_an_empty_map():
    model, proc = tiny_llava(attn="sdpa")
    ad = get_adapter(model)
    inputs = RGAE(model, proc).prepare(random_image(), "a red circle", None)
    with pytest.raises(AttentionCaptureError, match="eager"), AttentionRecorder(ad.llm_attention):
        model(**inputs.model_kwargs())


def test_explain_mode_restores_training_grad_flags_and_checkpointing():
    model, _ = tiny_llava()
    model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert flags
    with explain_mode(model):
        assert not model.training
        assert all(p.requires_grad for p in model.parameters())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.training
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert all(m.gradient_checkpointing for m in flags)


def test_frozen_model_without_graph_is_a_clear_error():
    model, proc = tiny_llava()
    model.requires_grad_(False)
    ad = get_adapter(model)
    inputs = RGAE(model, proc).prepare(random_image(), "a red circle", None)
    with pytest.raises(AttentionCaptureError, match="graph"), AttentionRecorder(ad.llm_attention):
        model(**inputs.model_kwargs())
    # RGAE itself makes the parameters require grad for the call, then restores them.
    e = RGAE(model, proc).attribute(random_image(), target="a red circle")
    assert e.text_to_patch.abs().max() > 0 and not any(p.requires_grad for p in model.parameters())


def test_recorder_order_and_per_head_clamp():
    model, proc = tiny_llava()
    ad = get_adapter(model)
    inputs = RGAE(model, proc).prepare(random_image(), "a red circle", None)
    rec = AttentionRecorder(ad.llm_attention)
    with explain_mode(model), rec:
        logits = model(**inputs.model_kwargs()).logits
    rec.check_complete()
    s = inputs.input_ids.shape[1]
    assert [tuple(a.shape) for a in rec.attentions] == [(1, 2, s, s)] * 2
    # Per-layer map: clamp per head before the head mean.
    rec.attentions = [torch.ones(1, 2, 1, 2)]
    cam = rec.cams([torch.tensor([[[[1.0, -1.0]], [[-1.0, 1.0]]]])])[0]
    assert torch.equal(cam, torch.tensor([[0.5, 0.5]]))
    assert logits.shape[1] == s


def test_adapters_read_geometry_from_the_config():
    model, _ = tiny_llava()
    ad = get_adapter(model)
    assert (ad.projector_kind, ad.patch_grid, ad.query_grid, ad.n_queries) == ("mlp", (4, 4), (4, 4), 16)
    assert (ad.vision_prefix, ad.feature_prefix, len(ad.llm_attention), len(ad.vision_attention)) == (1, 0, 2, 2)
    assert ad.num_vision_layers_used == 1  # vision_feature_layer=-2 of 2 layers
    for spec, kind, grid, n_attn in [("avgpool2_9", "avgpool", (3, 3), 0), ("qformer2_4", "qformer", (2, 2), 4),
                                     ("cabstractor_4", "cabstractor", (2, 2), 0)]:
        m, _ = tiny_deco(spec)
        ad = get_adapter(m)
        assert (ad.projector_kind, ad.query_grid, len(ad.projector_attention), ad.projector_type) == (
            kind, grid, n_attn, spec)
    with pytest.raises(ValueError, match="no rgae adapter"):
        get_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image tokens"):
        get_adapter(model).image_positions(torch.zeros(1, 5, dtype=torch.long))

"""DecoConfig / DecoForConditionalGeneration: every projector runs forward + generate with M image tokens; CLIP, SigLIP
and ViT (rectangular grid) vision, Llama and Qwen2 text; save/load round trips with identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig

from deco_models.configuration import DecoConfig, vision_patch_grid
from deco_models.modeling import DecoForConditionalGeneration
from deco_models.projectors import available_projectors
from tests.tiny import (
    tiny_deco_config,
    tiny_deco_model,
    tiny_image,
    tiny_inputs,
    tiny_processor,
    tiny_text_config,
    tiny_vision_config,
)

# One spec per family, sized for the tiny 4x4 patch grid (M = 4).
SPECS = {
    "linear": "linear",
    "mlp{N}x_gelu": "mlp2x_gelu",
    "avgpool{L}_{M}": "avgpool2_4",
    "maxpool{L}_{M}": "maxpool2_4",
    "qformer{L}_{M}": "qformer2_4",
    "cabstractor_{M}": "cabstractor_4",
    "dabstractor_{M}": "dabstractor_4",
}


def _spec(form: str) -> str:
    if form not in available_projectors():
        pytest.skip(f"projector form {form!r} is not registered (yet)")
    return SPECS[form]


@pytest.mark.parametrize("form", list(SPECS))
def test_every_projector_runs_forward_and_generate_with_m_image_tokens(form):
    spec = _spec(form)
    model = tiny_deco_model(spec)
    processor = tiny_processor(model)
    inputs = tiny_inputs(model, processor)
    m = model.config.num_image_tokens
    assert m == model.multi_modal_projector.num_queries
    assert m == (16 if spec in ("linear", "mlp2x_gelu") else 4)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == m
    out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    # transformers >= 5.24 deprecates `out.image_hidden_states` (a list from 5.30): ask the model itself.
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert len(feats) == 1 and feats[0].shape == (m, model.config.text_config.hidden_size)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_image_features_are_what_the_llm_sees():
    # The embeddings at the image-token positions must be the projector's output, in order.
    model = tiny_deco_model("avgpool2_4")
    inputs = tiny_inputs(model)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    torch.testing.assert_close(captured["embeds"][0, positions], feats, rtol=0, atol=0)


def test_cls_handling_per_backbone():
    clip = tiny_deco_config("mlp2x_gelu", vision="clip")
    siglip = tiny_deco_config("mlp2x_gelu", vision="siglip")
    assert clip.vision_feature_select_strategy == "default"
    assert siglip.vision_feature_select_strategy == "full"
    with pytest.raises(ValueError, match="no CLS token"):
        tiny_deco_config("mlp2x_gelu", vision="siglip", vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="CLS token"):
        tiny_deco_config("mlp2x_gelu", vision="clip", vision_feature_select_strategy="full")


@pytest.mark.parametrize(("vision", "text"), [("clip", "qwen2"), ("siglip", "llama"), ("siglip", "qwen2")])
def test_backbones(vision, text):
    model = tiny_deco_model("avgpool2_4", vision=vision, text=text)
    inputs = tiny_inputs(model)
    # SigLIP has no CLS: all 16 patches reach the projector; CLIP drops its CLS token.
    feats = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
    assert feats.shape[1] == (17 if vision == "clip" else 16)
    assert model(**inputs).logits.isfinite().all()


def test_rectangular_patch_grid_from_config():
    config = tiny_deco_config("avgpool2_4", vision="vit", image_size=(32, 48), patch_size=8)
    assert config.patch_grid == (4, 6)
    assert config.num_image_tokens == 4
    assert tiny_deco_config("mlp2x_gelu", vision="vit", image_size=(32, 48)).num_image_tokens == 24
    model = tiny_deco_model("avgpool2_4", vision="vit", image_size=(32, 48))
    assert model.multi_modal_projector.grid_hw == (4, 6)
    processor = tiny_processor(model)
    assert processor.image_size == (32, 48)
    inputs = tiny_inputs(model, processor)
    assert inputs["pixel_values"].shape == (1, 3, 32, 48)
    assert model(**inputs).logits.isfinite().all()


def test_patch_grid_never_from_sqrt():
    assert vision_patch_grid(CLIPVisionConfig(image_size=336, patch_size=14)) == (24, 24)
    assert vision_patch_grid(tiny_vision_config("vit", image_size=(16, 40), patch_size=8)) == (2, 5)
    with pytest.raises(ValueError, match="not a multiple"):
        vision_patch_grid(CLIPVisionConfig(image_size=30, patch_size=8))


def test_bad_projector_spec_and_too_many_queries():
    with pytest.raises(ValueError, match="Valid forms"):
        tiny_deco_config("avgpool2x_4")
    with pytest.raises(ValueError, match="more than"):
        tiny_deco_config("avgpool2_25")  # 25 > 16 patches
    with pytest.raises(ValueError, match="perfect square"):
        tiny_deco_config("avgpool2_8")


def test_image_token_id_alias_and_seq_length():
    config = tiny_deco_config("avgpool2_4")
    assert config.image_token_id == config.image_token_index
    assert config.image_seq_length == 4


@pytest.mark.parametrize("spec", ["mlp2x_gelu", "avgpool2_4"])
def test_save_load_roundtrip_identical_logits(tmp_path, spec):
    model = tiny_deco_model(spec, text="qwen2" if spec == "avgpool2_4" else "llama")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "deco"
    loaded, info = DecoForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(loaded.config, DecoConfig) and loaded.config.projector_type == spec
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager")
    assert isinstance(auto, DecoForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
        assert torch.equal(auto(**inputs).logits, expected)


def test_config_roundtrip_keeps_projector_kwargs_and_strategy(tmp_path):
    config = tiny_deco_config("avgpool2_4", vision="siglip", projector_kwargs={"bias": False})
    config.save_pretrained(tmp_path)
    again = DecoConfig.from_pretrained(tmp_path)
    assert again.projector_kwargs == {"bias": False}
    assert again.vision_feature_select_strategy == "full"
    assert again.patch_grid == (4, 4)
    model = DecoForConditionalGeneration(again)
    assert model.multi_modal_projector.mlp_projector[0].bias is None


def test_gradients_reach_projector_and_batch_of_two_images():
    model = tiny_deco_model("avgpool2_4").train()
    processor = tiny_processor(model)
    prompt = processor.render_prompt("what color ?")
    inputs = processor(text=[prompt, prompt], images=[tiny_image(seed=1), tiny_image(30, 20, seed=2)])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grad = model.multi_modal_projector.mlp_projector[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_text_only_forward():
    model = tiny_deco_model("avgpool2_4")
    processor = tiny_processor(model)
    inputs = processor(text=processor.render_prompt("what color ?", image=False))
    assert "pixel_values" not in inputs
    assert model(**inputs).logits.isfinite().all()


def test_llm_dims_come_from_text_config():
    config = DecoConfig(
        vision_config=tiny_vision_config("clip"),
        text_config=tiny_text_config("llama", hidden_size=48),
        projector_type="avgpool1_4",
        image_token_index=4,
    )
    model = DecoForConditionalGeneration(config)
    assert model.multi_modal_projector(torch.zeros(1, 16, 32)).shape == (1, 4, 48)


def test_multi_layer_features_and_image_token_id_kwarg():
    from tests.tiny import tiny_tokenizer

    image_id = tiny_tokenizer().convert_tokens_to_ids("<image>")
    config = tiny_deco_config("avgpool2_4", vision_feature_layer=[-2, -1])
    assert config.projector_input_size == 64  # two CLIP layers of width 32, concatenated
    model = DecoForConditionalGeneration(config).eval()
    assert model(**tiny_inputs(model)).logits.isfinite().all()
    by_alias = DecoConfig(
        vision_config=tiny_vision_config("clip"),
        text_config=tiny_text_config("llama"),
        projector_type="avgpool2_4",
        image_token_id=image_id,
    )
    assert by_alias.image_token_index == image_id


def test_fresh_projector_keeps_its_own_init():
    # post_init's generic init would zero every Linear bias; the projector family's own init must survive.
    model = tiny_deco_model("mlp2x_gelu")
    assert model.multi_modal_projector.linear_1.bias.abs().sum() > 0

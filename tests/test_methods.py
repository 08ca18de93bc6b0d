"""Explainers end to end on tiny models: a hand-built model whose answer is known, the Explanation's fields and
round trip, options, bad inputs, and the ``rgae explain`` command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reference import random_image, tiny_configs, tiny_deco, tiny_llava, tiny_tokenizer

from rgae import Explanation
from rgae.capture import NonFiniteGradientError
from rgae.methods import RGAE, AttentionRollout, GradCAM, Occlusion, RawAttention, load_image

ALL_METHODS = [RGAE, RawAttention, AttentionRollout, GradCAM, Occlusion]


# ---- a model whose attention is set by hand --------------------------------------------------------------------
def hand_model(hot_words=("a", "red", "circle")):
    """Llava whose answer is known: image patches are zero except a bright one, which becomes the only image token
    with content (dimension 0); every text token's query matches only that content, and the value it carries raises
    the logits of ``hot_words``. So the target's evidence is exactly the bright patch."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer()
    v, t = tiny_configs(tok, llm_layers=1, vision_layers=1)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).double().eval()
    d = 32
    image_dim, text_dim, out_dim, bias_dim = 0, 1, 2, 4
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.fill_(1.0)
        # A bright patch -> a +-1 feature vector after the pre-layernorm; a black patch -> 0.
        sign = torch.ones(d)
        sign[d // 2 :] = -1
        emb = next(m for m in model.model.vision_tower.modules() if hasattr(m, "patch_embedding"))
        emb.patch_embedding.weight.copy_(sign.view(d, 1, 1, 1).expand(d, 3, 8, 8) / (3 * 64))
        proj = model.model.multi_modal_projector
        proj.linear_1.weight[0] = sign / d
        proj.linear_2.weight[image_dim, 0] = 1.0
        proj.linear_2.bias[bias_dim] = 1.0  # breaks RMSNorm's scale invariance, so feature gradients are not 0
        lm = model.model.language_model
        lm.embed_tokens.weight[:, text_dim] = 1.0
        att = lm.layers[0].self_attn
        for h in range(2):  # dim 7 of each 16-dim head: RoPE barely rotates it over this short sequence
            att.q_proj.weight[h * 16 + 7, text_dim] = 1.2
            att.k_proj.weight[h * 16 + 7, image_dim] = 1.2
            att.v_proj.weight[h * 16, image_dim] = 0.1
            att.o_proj.weight[out_dim, h * 16] = 1.0
        for w in hot_words:
            model.lm_head.weight[tok.convert_tokens_to_ids(w), out_dim] = 3.0
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    return model, proc


def bright_patch_image(patch, grid=4, size=32):
    img = np.zeros((size, size, 3), np.uint8)
    r, c = divmod(patch, grid)
    s = size // grid
    img[r * s : (r + 1) * s, c * s : (c + 1) * s] = 255
    return img


@pytest.fixture(scope="module")
def hand():
    return hand_model()


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
def test_every_method_finds_the_known_patch(hand, method):
    model, proc = hand
    for patch in (6, 9):
        e = method(model, proc).attribute(bright_patch_image(patch), target="a red circle")
        assert int(e.seq_attr.argmax()) == patch
        assert int(e.token_attr[0].argmax()) == patch


def test_rgae_relevance_only_on_the_known_patch(hand):
    model, proc = hand
    e = RGAE(model, proc).attribute(bright_patch_image(6), target="a red circle")
    others = torch.cat([e.seq_attr[:6], e.seq_attr[7:]])
    assert e.seq_attr[6] > 0 and torch.all(others == 0)


# ---- the Explanation -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qformer():
    return tiny_deco("qformer2_4")


def test_explanation_fields_and_round_trip(qformer, tmp_path):
    model, proc = qformer
    e = RGAE(model, proc).attribute(random_image(hw=(20, 40)), target="a red circle on the pot")
    t = 6
    assert e.output_tokens == ["a", "red", "circle", "on", "the", "pot"]
    assert e.text_to_patch.shape == (t, 16) and e.text_to_query.shape == (t, 4) and e.query_to_patch.shape == (4, 16)
    assert e.patch_grid == (4, 4) and e.query_grid == (2, 2) and e.projector_type == "qformer2_4"
    assert torch.all((e.token_probs > 0) & (e.token_probs <= 1))
    ids = e.input_ids[0]
    assert torch.equal(ids[e.target_positions], e.token_ids)
    assert torch.all(ids[e.image_positions] == model.config.image_token_id) and e.image_positions.numel() == 4
    assert e.image.shape == (20, 40, 3) and e.image.dtype == np.uint8  # the original image
    # A 2:1 image padded to a square: the view covers the image plus 10 px of padding above and below.
    assert e.layout.views[0].box == (0.0, -10.0, 40.0, 30.0) and e.layout.views[0].grid == (4, 4)
    assert e.image_map(word="red").shape == (20, 40)
    assert e.word_ids == list(range(t)) and e.options["query_to_patch_rule"].startswith("qformer_gae")
    loaded = Explanation.load(e.save(tmp_path / "exp"))
    for name in ("text_to_patch", "text_to_query", "query_to_patch", "token_probs", "input_ids", "pixel_values",
                 "target_positions", "image_positions", "token_ids"):
        assert torch.equal(getattr(loaded, name), getattr(e, name)), name
    assert np.array_equal(loaded.image, e.image)
    assert (loaded.patch_grid, loaded.query_grid) == (e.patch_grid, e.query_grid)
    assert loaded.layout.to_dict() == e.layout.to_dict() and torch.equal(loaded.layout.positions, e.layout.positions)
    assert torch.equal(loaded.image_map(), e.image_map())
    assert loaded.options == e.options and loaded.output_tokens == e.output_tokens


def test_generated_target_is_explained(qformer):
    model, proc = qformer
    e = RGAE(model, proc).attribute(random_image(), target=None, max_new_tokens=3)
    assert 1 <= len(e.output_tokens) <= 3 and e.text_to_patch.shape[0] == len(e.output_tokens)


@pytest.mark.parametrize("projector", ["qformer2_4", "maxpool2_4"])
def test_bfloat16_model_gives_float32_maps(projector):
    model, proc = tiny_deco(projector, dtype=torch.bfloat16)
    e = RGAE(model, proc).attribute(random_image(), target="a red circle", through_vision=True)
    assert e.text_to_patch.dtype == torch.float32 and torch.isfinite(e.text_to_patch).all()
    assert e.text_to_patch.abs().max() > 0


def test_rawattn_options(qformer):
    model, proc = qformer
    exp = RawAttention(model, proc)
    a = exp.attribute(random_image(), target="a red circle", layer=0, heads=[1])
    b = exp.attribute(random_image(), target="a red circle", layer="mean")
    assert a.text_to_patch.shape == b.text_to_patch.shape == (3, 16)
    assert torch.all(a.text_to_patch >= 0) and not torch.allclose(a.text_to_patch, b.text_to_patch)
    with pytest.raises(ValueError, match="layer"):
        exp.attribute(random_image(), target="a red circle", layer=7)
    with pytest.raises(ValueError, match="heads"):
        exp.attribute(random_image(), target="a red circle", heads=[5])


def test_occlusion_captum_equals_plain_loop():
    pytest.importorskip("captum")
    model, proc = tiny_deco("avgpool2_4")
    a = Occlusion(model, proc).attribute(random_image(), target="a red circle", backend="captum")
    b = Occlusion(model, proc).attribute(random_image(), target="a red circle", backend="torch")
    assert b.text_to_patch.abs().max() > 0
    assert (a.text_to_patch - b.text_to_patch).abs().max() <= 1e-6  # captum accumulates in float32


# ---- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(qformer, tmp_path):
    model, proc = qformer
    exp = RGAE(model, proc)
    img = random_image()
    with pytest.raises(ValueError, match="empty"):
        exp.attribute(img, target="   ")
    with pytest.raises(ValueError, match="context"):
        exp.attribute(img, target=" ".join(["red"] * 200))
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image"):
        exp.attribute(corrupt, target="a red circle")
    with pytest.raises(ValueError, match="not found"):
        exp.attribute(tmp_path / "missing.png", target="a red circle")
    with pytest.raises(ValueError, match="one image at a time"):
        exp.attribute([img, img], target="a red circle")
    with pytest.raises(ValueError, match="one image at a time"):
        exp.attribute(np.stack([img, img]), target="a red circle")
    with pytest.raises(TypeError, match="unknown RGAE options"):
        exp.attribute(img, target="a red circle", trough_vision=True)


def test_nan_gradients_name_the_layer():
    model, proc = tiny_llava()
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="LLM layer"):
        RGAE(model, proc).attribute(random_image(), target="a red circle")


def test_image_modes():
    from PIL import Image

    gray16 = np.full((6, 5), 65535, dtype=np.uint16)
    assert np.asarray(load_image(gray16)).min() == 255  # scaled, not clipped
    assert np.asarray(load_image(Image.fromarray(np.full((6, 5), 1000, dtype=np.uint16)))).max() == round(1000 / 257)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    assert np.asarray(load_image(rgba)).min() == 255
    assert load_image(Image.new("L", (3, 2), 7)).mode == "RGB"
    assert np.asarray(load_image(np.full((2, 2, 3), 0.5))).max() == 128
    chw = np.zeros((3, 4, 5), np.uint8)
    assert load_image(chw).size == (5, 4)
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((2, 2), np.nan))


# ---- command line ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_explain_end_to_end(tmp_path):
    from PIL import Image

    from rgae.cli import main

    model, proc = tiny_llava(dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    Image.fromarray(random_image()).save(tmp_path / "img.png")
    for method in ("rgae", "rawattn", "gradcam"):
        out = tmp_path / method
        args = ["explain", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"),
                "--text", "A pot of green plants", "--method", method, "--out", str(out), "--device", "cpu"]
        assert main(args) == 0
        e = Explanation.load(out)
        assert e.method == method and e.text_to_patch.shape == (5, 16)
        assert e.target_text == "A pot of green plants"
    assert main(["explain", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "nope.png"),
                 "--text", "a", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    try:
        import rgae.viz  # noqa: F401
    except ImportError:
        return
    args = ["explain", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"), "--text",
            "a red circle", "--out", str(tmp_path / "v"), "--device", "cpu", "--visualize", "--vis-save-path",
            str(tmp_path / "figs")]
    assert main(args) == 0
    assert any((tmp_path / "figs").glob("*.png"))

"""The interface capture (rgae.attention_capture) on real tiny models: the model's own kernel runs and its logits are
unchanged, its settings come back (also after errors), the maps equal the eager capture's and the step-by-step
reference on GQA, sliding-window and bidirectional-image-block models, per-image vision calls form one block-diagonal
layer, and what cannot be captured is a clear error."""

from __future__ import annotations

import pytest
import torch
from test_reference import _check, _image_processor, random_image, relative_error, tiny_deco, tiny_llava, tiny_tokenizer

from rgae.adapters import get_adapter
from rgae.attention_capture import CAPTURE_PREFIX, InterfaceCapture, _batch_blocks, _call_blocks
from rgae.capture import AttentionCaptureError, AttentionRecorder, eager_attention, explain_mode
from rgae.methods import RGAE, AttentionRollout, RawAttention
from rgae.recompute import layer_cam, layer_probabilities
from rgae.rules import gradient_weighted_attention

REL_TOL = 1e-6


def llava_with_text(text_config, attn="sdpa", vision_config=None):
    """Stock Llava (tiny CLIP vision) around any transformers text config, float64, with a LlavaProcessor."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer()
    vision = vision_config or CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text_config,
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).double().eval()
    proc = LlavaProcessor(image_processor=_image_processor(32), tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")
    return model, proc


def _text(cls_name, **kwargs):
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=len(tiny_tokenizer()), max_position_embeddings=128)
    return getattr(transformers, cls_name)(**{**common, **kwargs})


def _impls(model):
    return {type(c).__name__: c._attn_implementation for c in (model.config, model.config.text_config,
                                                                  model.config.vision_config)}


# ---- the model as it runs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_are_the_models_own_and_every_setting_comes_back(attn):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, proc = tiny_llava(attn=attn, dtype=torch.float32)
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(random_image(), "a red circle", None)
    with torch.no_grad():
        plain = model(**inputs.model_kwargs()).logits
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ad = get_adapter(model)
    with explain_mode(model, require_grad=False), InterfaceCapture(model, {"llm": ad.llm_attention}) as cap:
        assert set(_impls(model).values()) == {CAPTURE_PREFIX + attn}
        name = CAPTURE_PREFIX + attn
        assert name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
        logits = model(**inputs.model_kwargs()).logits
        cap.check_complete()
        layers = cap.layers("llm")
    assert torch.equal(logits, plain)  # the model's own kernel, bit for bit
    assert [len(layer.outputs) for layer in layers] == [1, 1] and layers[0].outputs[0].requires_grad
    assert set(_impls(model).values()) == {attn} and model.training
    assert CAPTURE_PREFIX + attn not in ALL_ATTENTION_FUNCTIONS
    assert CAPTURE_PREFIX + attn not in ALL_MASK_ATTENTION_FUNCTIONS
    result = explainer.compute(inputs)
    assert torch.equal(result["token_probs"], explainer.token_probs(plain, inputs))
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="boom"), InterfaceCapture(model, {"llm": ad.llm_attention}):
        raise RuntimeError("boom")
    assert set(_impls(model).values()) == {attn} and CAPTURE_PREFIX + attn not in ALL_ATTENTION_FUNCTIONS


def test_each_sub_config_keeps_its_own_kernel():
    model, proc = tiny_llava(attn="sdpa")
    model.config.vision_config._attn_implementation = "eager"
    before = _impls(model)
    with InterfaceCapture(model, {}):
        assert _impls(model) == {k: CAPTURE_PREFIX + v for k, v in before.items()}
    assert _impls(model) == before
    e = RGAE(model, proc).attribute(random_image(), target="a red circle", through_vision=True)
    assert e.options["capture"] == "interface" and _impls(model) == before


# ---- exactness on the attention variants --------------------------------------------------------------------------
def test_grouped_query_attention_model():
    model, proc = llava_with_text(_text("LlamaConfig", num_attention_heads=4, num_key_value_heads=2))
    assert model.model.language_model.layers[0].self_attn.num_key_value_groups == 2
    _check(model, proc)


@pytest.mark.parametrize(
    "config",
    [
        ("MistralConfig", {"sliding_window": 5}),
        ("Qwen2Config", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 0}),
    ],
    ids=["mistral", "qwen2"],
)
def test_sliding_window_model_and_its_mask_really_slides(config):
    name, kwargs = config
    model, proc = llava_with_text(_text(name, **kwargs))
    _check(model, proc)
    inputs = RGAE(model, proc).prepare(random_image(), "a red circle on the green pot", None)
    ad = get_adapter(model)
    with torch.no_grad(), InterfaceCapture(model, {"llm": ad.llm_attention}, graph=False) as cap:
        model(**inputs.model_kwargs())
    n = inputs.input_ids.shape[1]
    assert n > 4 * kwargs["sliding_window"]
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    expected = (j <= i) & (i - j < kwargs["sliding_window"])
    for layer in cap.layers("llm"):
        (block,) = layer.blocks
        assert block.mask is not None and torch.equal(block.mask[0], expected)


def _tiny_gemma3(attn: str, softcap: float | None):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=128,
                            sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                            attn_logit_softcapping=softcap)
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=5,
                       boi_token_index=6, eoi_token_index=7)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).double().eval()
    ids = torch.tensor([[2, 9, 10, 6, 5, 5, 5, 5, 7, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    kwargs = {"input_ids": ids, "token_type_ids": (ids == 5).long(), "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)}
    return model, kwargs


@pytest.mark.parametrize("attn, softcap", [("sdpa", None), ("eager", 3.0)], ids=["sdpa", "eager-softcap"])
def test_gemma3_bidirectional_image_block(attn, softcap):
    """Gemma3 text attends bidirectionally inside the image when token_type_ids are passed (and through a sliding
    window on its sliding layers): the interface cams equal the eager probabilities' exactly."""
    model, kwargs = _tiny_gemma3(attn, softcap)
    modules = [m for m in model.model.language_model.modules() if type(m).__name__ == "Gemma3Attention"]
    target = lambda logits: logits[0, -1, 20] - logits[0, -3, 21]  # two positions: rows after one of them too
    with explain_mode(model, require_grad=False), InterfaceCapture(model, {"llm": modules}) as cap:
        logits = model(**kwargs).logits
        layers = cap.layers("llm")
        grads = torch.autograd.grad(target(logits), [o for layer in layers for o in layer.outputs])
    cams = [layer_cam(layer.blocks, layer.block_grads([g]), layer.n_q, layer.n_k)[0]
            for layer, g in zip(layers, grads)]
    with explain_mode(model), eager_attention(model), AttentionRecorder(modules) as rec:
        eager_logits = model(**kwargs).logits
        probs = rec.attentions
        eager_grads = torch.autograd.grad(target(eager_logits), probs)
    expected = [gradient_weighted_attention(a[0], g[0]) for a, g in zip(probs, eager_grads)]
    for cam, ref in zip(cams, expected):
        assert ref.abs().max() > 0 and relative_error(cam, ref) <= REL_TOL
    image = (kwargs["input_ids"][0] == 5).nonzero().flatten()
    first, last = int(image[0]), int(image[-1])
    for layer, p in zip(layers, probs):
        recomputed = layer_probabilities(layer.blocks, layer.n_q, layer.n_k)
        assert relative_error(recomputed, p[0]) <= REL_TOL
        assert bool((recomputed[:, first, last] > 0).all())  # an earlier image token sees a later one
    assert bool((probs[0][0][:, -1, :5] == 0).all())  # the sliding window (6) hides the start from the last token


# ---- several calls of one module: a block-diagonal layer ----------------------------------------------------------
_STORE: list = []


def _recording_eager(module, query, key, value, attention_mask, **kwargs):
    """Test oracle: Qwen2-VL's own eager attention, keeping its probabilities (with graph) per call."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

    out, probs = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _STORE.append(probs)
    return out, probs


def test_per_image_vision_calls_form_one_block_diagonal_layer():
    """Qwen2-VL's vision attention calls the kernel once per image and returns no probabilities even in eager."""
    from transformers import Qwen2VLVisionConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4,
                              spatial_merge_size=2, temporal_patch_size=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel(cfg).double().eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # two images: 16 and 8 patches
    n = int(grid.prod(-1).sum())
    pixels = torch.randn(n, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    modules = [blk.attn for blk in tower.blocks]
    weights = torch.randn(n // 4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = lambda out: (out.pooler_output * weights).sum()
    with explain_mode(tower, require_grad=False), InterfaceCapture(tower, {"vision": modules}) as cap:
        out = tower(hidden_states=pixels, grid_thw=grid)
        layers = cap.layers("vision")
        grads = torch.autograd.grad(target(out), [o for layer in layers for o in layer.outputs])
    assert [len(layer.outputs) for layer in layers] == [2, 2] and layers[0].n_q == n
    cams, i = [], 0
    for layer in layers:
        cams.append(layer_cam(layer.blocks, layer.block_grads(grads[i : i + 2]), n, n)[0])
        i += 2
    AttentionInterface.register("test_recording_eager", _recording_eager)
    _STORE.clear()
    try:
        tower.config._attn_implementation = "test_recording_eager"
        with explain_mode(tower):
            ref_out = tower(hidden_states=pixels, grid_thw=grid)
            probs = list(_STORE)
            ref_grads = torch.autograd.grad(target(ref_out), probs)
    finally:
        tower.config._attn_implementation = "sdpa"
        AttentionInterface._global_mapping.pop("test_recording_eager", None)
    assert "test_recording_eager" not in ALL_ATTENTION_FUNCTIONS and len(probs) == 4
    for layer_index, cam in enumerate(cams):
        chunk = [gradient_weighted_attention(p[0], g[0]) for p, g in
                 zip(probs[2 * layer_index : 2 * layer_index + 2], ref_grads[2 * layer_index : 2 * layer_index + 2])]
        expected = torch.block_diag(*chunk)
        assert expected.abs().max() > 0 and relative_error(cam, expected) <= REL_TOL
        assert torch.equal(cam[:16, 16:], torch.zeros(16, 8))  # images never attend to each other


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_batched_call_is_one_block_diagonal_layer(kernel):
    """A vision tower encodes an image's views as a batch: example b's tokens follow example b − 1's, nothing crosses
    between examples, and each example's mask stays its own."""
    from transformers import CLIPVisionConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.clip.modeling_clip import CLIPAttention

    cfg = CLIPVisionConfig(hidden_size=16, num_attention_heads=2)
    cfg._attn_implementation = kernel
    attn = CLIPAttention(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    mask[1, :, :, 3:] = torch.finfo(torch.float64).min  # example 1 sees only its first three keys
    blocks = _batch_blocks(kernel, attn, q, k, v, mask, {"scaling": 0.5})
    assert [(b.q_offset, b.k_offset) for b in blocks] == [(0, 0), (5, 5), (10, 10)]
    probs = layer_probabilities(blocks, 15, 15)
    per_example = [torch.softmax(q[b] @ k[b].transpose(-1, -2) * 0.5 + mask[b], -1) for b in range(3)]
    expected = torch.stack([torch.block_diag(*[p[h] for p in per_example]) for h in range(2)])
    assert relative_error(probs, expected) <= REL_TOL and float(probs[:, 5:10, 8:10].abs().max()) == 0.0
    with InterfaceCapture(attn, {"vision": [attn]}) as cap:
        fn = ALL_ATTENTION_FUNCTIONS[CAPTURE_PREFIX + kernel]
        out, _ = fn(attn, q, k, v, mask, scaling=0.5, dropout=0.0)
        layer = cap.layers("vision")[0]
    assert (layer.n_q, layer.n_k) == (15, 15) and out.shape == (3, 5, 2, 8)
    grads = layer.block_grads([torch.ones_like(out)])
    assert [tuple(g.shape) for g in grads] == [(1, 2, 5, 8)] * 3


# ---- flash attention's masking rules (the kernel itself needs a GPU) -----------------------------------------------
def _module():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1), 0)


def test_flash_call_rules_equal_the_masks_transformers_builds_for_sdpa():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    g = torch.Generator().manual_seed(0)
    n = 9
    q = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = _module()

    def probs(original, mask, **kwargs):
        blocks = _call_blocks(original, module, q, k, v, mask, {"scaling": 0.4, **kwargs})
        return layer_probabilities(blocks, n, n)

    window = sdpa_mask(1, n, n, mask_function=sliding_window_causal_mask_function(3), allow_is_causal_skip=False)
    assert relative_error(probs("flash_attention_2", None, sliding_window=3), probs("sdpa", window)) <= 1e-12
    padding = torch.ones(1, n, dtype=torch.long)
    padding[0, :2] = 0  # left padding
    padded = sdpa_mask(1, n, n, attention_mask=padding.bool(), allow_is_causal_skip=False)
    flash_padded, sdpa_padded = probs("flash_attention_2", padding), probs("sdpa", padded)
    assert relative_error(flash_padded[:, 2:], sdpa_padded[:, 2:]) <= 1e-12
    assert torch.equal(flash_padded[:, :2], torch.zeros(2, 2, n))  # flash gives padded queries no attention
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = probs("flash_attention_2", None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    diag = torch.block_diag(torch.ones(4, 4), torch.ones(5, 5)).bool() & torch.ones(n, n).tril().bool()
    assert relative_error(packed, probs("sdpa", diag.view(1, 1, n, n))) <= 1e-12
    by_positions = probs("flash_attention_2", None, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]))
    assert torch.equal(by_positions, packed)
    # sdpa without a mask follows the module's causal flag; eager without a mask attends everywhere.
    assert relative_error(probs("sdpa", None), probs("sdpa", torch.ones(n, n).tril().bool().view(1, 1, n, n))) == 0
    assert bool((probs("eager", None) > 0).all())


# ---- the other attention-based methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("projector", ["qformer2_4", "avgpool2_4"])
def test_raw_attention_and_rollout_recompute_what_eager_records(projector):
    model, proc = tiny_deco(projector, attn="sdpa")
    image = random_image()
    for method, options in [(RawAttention, {}), (RawAttention, {"layer": 0, "heads": [1]}),
                            (RawAttention, {"layer": "mean"}), (AttentionRollout, {}),
                            (AttentionRollout, {"heads": [0], "residual": 0.3})]:
        explainer = method(model, proc)
        a = explainer.attribute(image, target="a red circle", **options)
        b = explainer.attribute(image, target="a red circle", capture="eager", **options)
        assert a.options["capture"] == "interface" and b.options["capture"] == "eager"
        for name in ("text_to_patch", "text_to_query", "query_to_patch"):
            assert relative_error(getattr(a, name), getattr(b, name)) <= REL_TOL, (method.__name__, options, name)
    with pytest.raises(ValueError, match="capture"):
        RawAttention(model, proc).attribute(image, target="a red circle", capture="hooks")


# ---- what cannot be captured ---------------------------------------------------------------------------------------
def test_active_dropout_is_an_error_and_explanations_force_eval():
    model, proc = llava_with_text(_text("LlamaConfig", attention_dropout=0.5))
    model.train()
    inputs = RGAE(model, proc).prepare(random_image(), "a red circle", None)
    ad = get_adapter(model)
    with pytest.raises(AttentionCaptureError, match="dropout"), InterfaceCapture(model, {"llm": ad.llm_attention}):
        model(**inputs.model_kwargs())
    assert model.config.text_config._attn_implementation == "sdpa"
    e = RGAE(model, proc).attribute(random_image(), target="a red circle")
    assert model.training and e.text_to_patch.abs().max() > 0


def test_attention_that_bypasses_the_interface_is_named():
    """Data2VecVision computes attention itself: the capture names the class instead of returning empty maps."""
    from transformers import Data2VecVisionConfig

    vision = Data2VecVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    model, proc = llava_with_text(_text("LlamaConfig"), attn="eager", vision_config=vision)
    with pytest.raises(AttentionCaptureError, match="Data2VecVisionSelfAttention.*never called"):
        RGAE(model, proc).attribute(random_image(), target="a red circle", through_vision=True)
    assert model.config.vision_config._attn_implementation == "eager"
    e = RGAE(model, proc).attribute(random_image(), target="a red circle")  # the LLM does use the interface
    assert e.text_to_patch.abs().max() > 0


def test_unsupported_kernels_and_kernel_arguments_are_named():
    model, proc = tiny_llava(attn="sdpa")
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(AttentionCaptureError, match="flex_attention"), InterfaceCapture(model, {}):
        pass
    model.config.text_config._attn_implementation = "sdpa"
    ad = get_adapter(model)
    attn = ad.llm_attention[0]
    q = torch.zeros(1, 2, 3, 16, dtype=torch.float64)
    kv = torch.zeros(1, 2, 3, 16, dtype=torch.float64)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with InterfaceCapture(model, {"llm": ad.llm_attention}):
        fn = ALL_ATTENTION_FUNCTIONS[CAPTURE_PREFIX + "sdpa"]
        with pytest.raises(AttentionCaptureError, match="LlamaAttention.*attention sinks"):
            fn(attn, q, kv, kv, None, scaling=0.25, s_aux=torch.zeros(2))
    with pytest.raises(AttentionCaptureError, match="another rgae capture"):
        with InterfaceCapture(model, {}), InterfaceCapture(model, {}):
            pass
    assert model.config.text_config._attn_implementation == "sdpa"


def test_llm_layers_without_an_attention_matrix_are_named():
    """LFM2's short-convolution layers mix tokens without attention: both captures explain through its attention
    layers only, and the Explanation says which layers were not explained."""
    text = _text("Lfm2Config", num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3)
    model, proc = llava_with_text(text)
    _check(model, proc)
    for method in (RGAE, RawAttention, AttentionRollout):
        e = method(model, proc).attribute(random_image(), target="a red circle")
        assert e.options["llm_layers_without_attention"] == ["layer 0 (Lfm2ShortConv)", "layer 2 (Lfm2ShortConv)"]
        assert "not explained" in e.options["explained_through"]
    plain, _ = tiny_llava()
    assert "llm_layers_without_attention" not in RGAE(plain, proc).attribute(random_image(), target="a red").options

"""The fast R-GAE path (one teacher-forced forward, one gradient per token, row trick, engine rules) equals a slow,
independently written reference: step-by-step generation of the target prefix, one forward and one backward per
step, full-matrix propagation, every rule written out here in plain torch (float64 tiny models, <= 1e-6 relative),
with either capture: through transformers' attention interface (the default) and eager (every probability recorded).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgae.adapters import get_adapter
from rgae.capture import eager_attention
from rgae.methods import RGAE

REL_TOL = 1e-6


# ---- tiny models (real transformers classes, word-level tokenizer built in memory) ------------------------------
WORDS = (
    "a an the pot of green plants red blue circle square cat dog on in describe image sentence one . is "
    "USER: ASSISTANT: A chat between curious user and artificial intelligence assistant"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def tiny_configs(tok, image=32, patch=8, llm_layers=2, vision_layers=2):
    from transformers import CLIPVisionConfig, LlamaConfig

    v = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=image, patch_size=patch,
    )
    t = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=llm_layers, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
    )
    return v, t


def _image_processor(image):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})


def tiny_llava(dtype=torch.float64, attn="eager", vision_feature_layer=-2, vision_layers=2):
    """Stock transformers Llava (MLP projector) with a LlavaProcessor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer()
    v, t = tiny_configs(tok, vision_layers=vision_layers)
    cfg = LlavaConfig(
        vision_config=v, text_config=t, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    proc = LlavaProcessor(
        image_processor=_image_processor(32), tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )
    return model, proc


def tiny_deco(projector, dtype=torch.float64, vision_feature_layer=-2, attn="eager"):
    """A deco model (any projector spec) with a DecoProcessor; 4x4 patch grid; ``attn`` its attention kernel."""
    from deco_models.configuration import DecoConfig
    from deco_models.modeling import DecoForConditionalGeneration
    from deco_models.processing import DecoProcessor

    tok = tiny_tokenizer()
    v, t = tiny_configs(tok)
    cfg = DecoConfig(
        vision_config=v, text_config=t, projector_type=projector,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=vision_feature_layer,
    )
    torch.manual_seed(0)
    model = DecoForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn)
    proc = DecoProcessor(_image_processor(32), tok, num_image_tokens=cfg.num_image_tokens, chat_template="plain")
    return model, proc


def random_image(seed=0, hw=(20, 28)):
    return np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


# ---- the slow reference -----------------------------------------------------------------------------------------
def _cam(attn, grad):
    """mean over heads of (G ⊙ A)+, clamped per head."""
    if grad is None:
        return torch.zeros(attn.shape[-2:], dtype=attn.dtype, device=attn.device)
    return (grad[0] * attn[0]).clamp(min=0).mean(0).detach()


def _normalize(R):
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    res = R - eye
    s = res.sum(-1, keepdim=True)
    s[s == 0] = 1
    return res / s + eye


def _record(modules):
    store, handles = [], []
    for m in modules:
        handles.append(m.register_forward_hook(lambda mod, args, out: store.append(out[1])))
    return store, handles


def reference_rgae(model, inputs, through_vision=False):
    """Step by step: for step t, forward over prompt + target[:t], backward of target[t]'s logit at the last
    position, full-matrix GAE. Returns (t2q [T, M], q2p [T, M, N], t2p [T, N])."""
    ad = get_adapter(model)
    kind = ad.projector_kind
    prompt = inputs.input_ids[:, : inputs.prompt_len]
    target = inputs.target_ids
    img_pos = inputs.image_positions
    for p in model.parameters():
        p.requires_grad_(True)
    t2qs, q2ps, t2ps = [], [], []
    for t in range(target.numel()):
        ids = torch.cat([prompt, target[:t].view(1, -1)], dim=1)
        proj_store, h1 = _record([m for _, m in ad.projector_attention])
        vis_store, h2 = _record(ad.vision_attention)
        io = {}
        h3 = ad.projector.register_forward_hook(lambda mod, args, out, io=io: io.update(x=args[0], y=out))
        try:
            out = model(input_ids=ids, pixel_values=inputs.pixel_values, output_attentions=True, use_cache=False)
        finally:
            for h in [*h1, *h2, h3]:
                h.remove()
        logit = out.logits[0, -1, target[t]]
        llm_attn = list(out.attentions)
        tensors = [*llm_attn, *proj_store, *vis_store, io["y"]]
        grads = torch.autograd.grad(logit, tensors, retain_graph=True, allow_unused=True)
        n_llm, n_proj = len(llm_attn), len(proj_store)
        # Text-to-Query: the full product R = (I + cam_L) ... (I + cam_1), last row, image columns.
        n = ids.shape[1]
        R = torch.eye(n, dtype=logit.dtype, device=logit.device)
        for a, g in zip(llm_attn, grads[:n_llm]):
            R = R + _cam(a, g) @ R
        t2q = R[-1, img_pos]
        # ViT (optional): full product over its layers, normalized, patch rows/cols.
        r_vit = None
        if through_vision:
            nv = vis_store[0].shape[-1]
            r_vit = torch.eye(nv, dtype=logit.dtype, device=logit.device)
            for a, g in zip(vis_store, grads[n_llm + n_proj : -1]):
                r_vit = r_vit + _cam(a, g) @ r_vit
        x, y = io["x"], io["y"]
        n_patch, m = ad.n_patches, ad.n_queries
        if kind in ("linear", "mlp"):
            q2p = torch.eye(m, dtype=logit.dtype, device=logit.device)
        elif kind == "avgpool":
            # The Jacobian of adaptive_avg_pool2d on the patch grid (rows: queries, cols: patches).
            def pool(z, grid=ad.patch_grid, out=ad.query_grid):
                return F.adaptive_avg_pool2d(z.view(1, 1, *grid), out).flatten()

            q2p = torch.autograd.functional.jacobian(pool, torch.zeros(n_patch, dtype=logit.dtype, device=logit.device))
        elif kind == "qformer":
            R_qq = torch.eye(m, dtype=logit.dtype, device=logit.device)
            R_qk = torch.zeros(m, n_patch, dtype=logit.dtype, device=logit.device)
            pre = ad.vision_prefix
            R_kk = torch.eye(n_patch, dtype=logit.dtype, device=logit.device) if r_vit is None else r_vit[pre:, pre:]
            for (lk, _), a, g in zip(ad.projector_attention, proj_store, grads[n_llm : n_llm + n_proj]):
                cam = _cam(a, g)
                if lk == "self":
                    R_qq, R_qk = R_qq + cam @ R_qq, R_qk + cam @ R_qk
                else:  # rule 10 (R_kq = 0, so rule 11 adds nothing)
                    R_qk = R_qk + _normalize(R_qq).T @ cam @ _normalize(R_kk)
            q2p = R_qk
        else:  # gradient rule, one backward per query through the full graph
            g_out = grads[-1][0].detach()
            rows = []
            for q in range(m):
                (dx,) = torch.autograd.grad((y[0, q] * g_out[q]).sum(), x, retain_graph=True)
                rows.append((dx[0] * x[0].detach()).sum(-1).clamp(min=0))
            q2p = torch.stack(rows)
            s = q2p.sum(-1, keepdim=True)
            q2p = q2p / torch.where(s > 0, s, torch.ones_like(s))
        if r_vit is not None and kind != "qformer":
            q2p = q2p @ _normalize(r_vit)[ad.vision_prefix :, ad.vision_prefix :]
        t2qs.append(t2q.detach())
        q2ps.append(q2p.detach())
        t2ps.append((t2q @ q2p).detach())
    return torch.stack(t2qs), torch.stack(q2ps), torch.stack(t2ps)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


def _check(model, proc, through_vision=False, target="a red circle on the green pot", **prepare_kwargs):
    """Both captures of the fast path equal the step-by-step reference: the interface capture (the model's own
    kernel, the default) and the eager one (every probability recorded), each to 1e-6 relative (float64)."""
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(random_image(), target, None, **prepare_kwargs)
    with eager_attention(model):  # the reference reads output_attentions, which only eager attention returns
        t2q, q2p, t2p = reference_rgae(model, inputs, through_vision=through_vision)
    assert (t2q.abs().max() > 0) and (t2p.abs().max() > 0), "degenerate case: nothing to compare"
    results = {}
    for capture in ("interface", "eager"):
        fast = explainer.compute(inputs, through_vision=through_vision, capture=capture)
        assert fast["text_to_query"].shape == t2q.shape
        assert relative_error(fast["text_to_query"], t2q) <= REL_TOL, capture
        assert relative_error(fast["text_to_patch"], t2p) <= REL_TOL, capture
        assert relative_error(fast["query_to_patch"], q2p.mean(0)) <= REL_TOL, capture
        per_token = fast["query_to_patch_per_token"]
        if per_token is not None:
            assert relative_error(per_token, q2p) <= REL_TOL, capture
        results[capture] = fast
    return results["interface"], (t2q, q2p, t2p)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reference_stock_llava(attn):
    model, proc = tiny_llava(attn=attn)
    _check(model, proc)
    assert model.config.text_config._attn_implementation == attn


def test_reference_stock_llava_through_vision():
    model, proc = tiny_llava(attn="sdpa")
    fast, _ = _check(model, proc, through_vision=True)
    assert fast["query_to_patch_per_token"] is not None


@pytest.mark.parametrize(
    "projector", ["mlp2x_gelu", "avgpool2_9", "maxpool2_4", "qformer2_4", "cabstractor_4", "dabstractor_4"]
)
def test_reference_deco(projector):
    model, proc = tiny_deco(projector, attn="sdpa")
    _check(model, proc)


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["avgpool2_4", "qformer2_4", "maxpool2_4"])
def test_reference_deco_through_vision(projector):
    model, proc = tiny_deco(projector, attn="sdpa")
    _check(model, proc, through_vision=True)


@pytest.mark.parametrize(
    "vision, text, projector, image_size, through_vision",
    [
        ("siglip", "qwen2", "avgpool2_4", 32, False),  # no CLS token ('full' strategy), Qwen2 attention
        pytest.param("siglip", "qwen2", "maxpool2_4", 32, True, marks=pytest.mark.slow),
        pytest.param("vit", "llama", "qformer2_4", (32, 48), True, marks=pytest.mark.slow),  # rectangular 4x6 grid
    ],
)
def test_reference_other_backbones(vision, text, projector, image_size, through_vision):
    from tiny import tiny_deco_model, tiny_processor

    model = tiny_deco_model(projector, vision=vision, text=text, image_size=image_size, dtype=torch.float64,
                            attn_implementation="sdpa")
    fast, _ = _check(model, tiny_processor(model), through_vision=through_vision)
    ad = get_adapter(model)
    assert fast["text_to_patch"].shape[1] == ad.n_patches
    if image_size == (32, 48):
        assert ad.patch_grid == (4, 6)


@pytest.mark.parametrize("projector", ["qformer2_4", "maxpool2_4"])
def test_batched_gradients_equal_the_loop(projector):
    model, proc = tiny_deco(projector)
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(random_image(), "a red circle on the green pot", None)
    loop = explainer.compute(inputs, through_vision=True, grad_batch=1)
    batched = explainer.compute(inputs, through_vision=True, grad_batch=4)  # 6 tokens: chunks of 4 and 2
    for key in ("text_to_query", "text_to_patch", "query_to_patch"):
        assert (loop[key] - batched[key]).abs().max() <= 1e-12, key


def test_auto_grad_batch_is_one_token_at_a_time_on_the_cpu():
    from rgae.methods.rgae import auto_grad_batch

    logits = torch.zeros(6, requires_grad=True)
    assert auto_grad_batch(logits, [torch.zeros(4, 8, 8)]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_grad_batch_on_cuda_batches_within_the_budget_and_keeps_the_maps():
    from rgae.methods.rgae import AUTO_GRAD_BATCH_BYTES, auto_grad_batch

    logits = torch.zeros(40, device="cuda")
    assert auto_grad_batch(logits, [torch.zeros(4, 8, 8, device="cuda")]) == 16
    huge = torch.empty(1, device="cuda").expand(AUTO_GRAD_BATCH_BYTES // 4 // 3)  # numel without the memory
    free, _ = torch.cuda.mem_get_info()
    expected = max(1, min(16, min(AUTO_GRAD_BATCH_BYTES, free // 4) // (huge.numel() * 4)))
    assert auto_grad_batch(logits, [huge]) == expected
    model, proc = tiny_deco("avgpool2_4")
    model = model.cuda()
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(random_image(), "a red circle on the green pot", None)
    auto, loop = explainer.compute(inputs), explainer.compute(inputs, grad_batch=1)
    assert (auto["text_to_patch"] - loop["text_to_patch"]).abs().max() <= 1e-10

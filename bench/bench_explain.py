"""Benchmark R-GAE's fast path against the slow step-by-step reference and against the gradient floor.

Model: a random mid-size stock Llava (LLM: Llama hidden 512 x 8 layers, 8 heads, vocab 32000; ViT: CLIP hidden 256 x
4 layers, 96 px / 8 px patches = 144 image tokens; MLP projector), prompt + 16-token target ~ 300 tokens.

Parts, each in its own process (so peak memory is per part):
  fast         RGAE.compute (capture="interface", the default): one teacher-forced forward with the model's sdpa
               kernel, one autograd.grad per target token w.r.t. the attention outputs, probabilities recomputed
               in chunks into the row trick
  fast_eager   the same with capture="eager": eager attention, every probability tensor recorded
  fast_b16     the default with grad_batch=16 (one vmapped backward for all 16 tokens)
  reference    tests/test_reference.reference_rgae: per step one forward over prompt + prefix, one backward,
               full-matrix propagation
  floor        one sdpa forward + 16 backward passes (autograd.grad of each target logit w.r.t. every LLM layer's
               attention output, the gradients the default path needs; parameters frozen) and nothing else
  floor_eager  one eager forward + 16 backward passes w.r.t. the LLM attention probabilities (the gradients the
               eager capture needs)
Times: one process, warm-up rounds, then round-robin timed rounds over the parts (so a change of machine load hits
every part alike); medians. Peak memory: one run per part in its own process, CUDA max_memory_allocated or, on CPU,
the process's peak RSS growth over the loaded model. Runs on CUDA when available.

Usage: python bench/bench_explain.py [--warmup 3] [--repeat 5] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import round_robin, sync_device  # noqa: E402

PARTS = ("fast", "fast_eager", "fast_b16", "reference", "floor", "floor_eager")


def build(device: str):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = [f"w{i}" for i in range(32000 - len(specials))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    v = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         image_size=96, patch_size=8)
    t = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(device).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    import numpy as np

    from rgae.methods import RGAE

    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    prompt = "USER: <image>\n" + " ".join(f"w{i}" for i in range(130)) + " ASSISTANT:"
    target = " ".join(f"w{1000 + i}" for i in range(16))
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(image, target, prompt)
    return model, explainer, inputs


def part_functions(model, explainer, inputs, device: str) -> dict:
    """The timed callables, one per part, on one built model."""
    import torch

    from rgae.capture import AttentionRecorder, eager_attention, explain_mode

    sys.path.insert(0, str(ROOT / "tests"))
    from test_reference import reference_rgae

    def reference():
        with eager_attention(model):
            return reference_rgae(model, inputs)

    def floor_eager():
        rec = AttentionRecorder(explainer.adapter.llm_attention)
        with explain_mode(model), eager_attention(model), torch.enable_grad(), rec:
            logits, offset = explainer.forward(inputs)
            target = explainer.target_logits(logits, inputs, offset)
            for t in range(target.numel()):
                torch.autograd.grad(target[t], rec.attentions, retain_graph=True, allow_unused=True)

    from bench_memory import part_functions as memory_parts

    def floor():
        with explain_mode(model, require_grad=False):
            memory_parts(explainer, inputs, None)["floor"]()

    return {
        "fast": lambda: explainer.compute(inputs),
        "fast_eager": lambda: explainer.compute(inputs, capture="eager"),
        "fast_b16": lambda: explainer.compute(inputs, grad_batch=16),
        "reference": reference,
        "floor": floor,
        "floor_eager": floor_eager,
    }


def run_memory(part: str, device: str) -> dict:
    """Peak memory of one run of ``part`` (own process; CPU: peak RSS growth over the loaded model)."""
    import torch

    model, explainer, inputs = build(device)
    fn = part_functions(model, explainer, inputs, device)[part]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        fn()  # warm-up (CUDA context, kernels) before the measured run
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fn()
    sync_device(device)
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB on Linux
    return {"part": part, "peak_mb": peak_mb, "seq_len": int(inputs.input_ids.shape[1]),
            "image_tokens": int(inputs.image_positions.numel()), "target_tokens": int(inputs.target_ids.numel())}


def run_times(parts: list[str], device: str, warmup: int, repeat: int) -> dict:
    """Interleaved timing in one process (round-robin over the parts, so load changes hit all parts alike)."""
    model, explainer, inputs = build(device)
    return round_robin(part_functions(model, explainer, inputs, device), parts, device, warmup, repeat)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the per-part peak-memory processes")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part:  # child process: memory of one part
        print(json.dumps(run_memory(args.part, args.device)))
        return 0
    parts = args.parts.split(",")
    results = {part: {} for part in parts}
    if not args.no_memory:
        for part in parts:
            cmd = [sys.executable, __file__, "--part", part, "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            results[part].update(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[part]
            print(f"{part:10s} peak +{r['peak_mb']:.0f} MiB  (seq {r['seq_len']}, image tokens {r['image_tokens']}, "
                  f"target {r['target_tokens']})", flush=True)
    for part, r in run_times(parts, args.device, args.warmup, args.repeat).items():
        results[part].update(r)
        print(f"{part:10s} median {r['median_s']:.3f} s  runs {[round(t, 3) for t in r['times_s']]}", flush=True)
    if {"fast", "reference"} <= results.keys():
        print(f"reference / fast = {results['reference']['median_s'] / results['fast']['median_s']:.2f}x")
    if {"fast", "floor"} <= results.keys():
        ratio = results["fast"]["median_s"] / results["floor"]["median_s"]
        print(f"fast / floor (1 sdpa forward + 16 backward) = {ratio:.2f}x")
    if {"fast_eager", "floor_eager"} <= results.keys():
        ratio = results["fast_eager"]["median_s"] / results["floor_eager"]["median_s"]
        print(f"fast_eager / floor_eager (1 eager forward + 16 backward) = {ratio:.2f}x")
    if {"fast_b16", "reference", "floor"} <= results.keys():
        ratio = results["reference"]["median_s"] / results["fast_b16"]["median_s"]
        print(f"reference / fast_b16 = {ratio:.2f}x; "
              f"fast_b16 / floor = {results['fast_b16']['median_s'] / results['floor']['median_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

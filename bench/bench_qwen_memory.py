"""Peak memory (and time) of R-GAE on a mid-size random Qwen2-VL-shaped model with a 1,024 × 768 image against the
gradient floor.

Model: a random ``Qwen2VLForConditionalGeneration``, LLM hidden 512 × 8 layers × 8 heads (2 key/value heads, as
Qwen2-VL's GQA; intermediate 1376, vocab 32000, M-RoPE), vision tower embed 256 × 4 layers × 4 heads (14-px patches,
2×2 merger to 512), sdpa attention, parameters frozen, float32. The image (1,024 wide, 768 high) is resized by the
processor's ``smart_resize`` to 1,036 × 756: 74 × 54 = 3,996 patches, 999 LLM image tokens; the prompt is the chat
template around one instruction, the target 16 words (n ≈ 1,030 tokens).

Parts (as ``bench/bench_memory.py``, whose functions run them):
  floor      one sdpa forward with grad, then one autograd.grad per target token of its logit w.r.t. every LLM
             layer's attention output (o_proj input); no rgae, parameters frozen
  interface  RGAE.compute (capture="interface", the default): the model's sdpa kernel, probabilities recomputed in
             chunks and streamed into the row trick
  eager      RGAE.compute(capture="eager"): eager attention with every LLM probability tensor recorded

Peak memory: ``--mem-repeat`` fresh processes per part (median); in each, one warm-up run, then the peak RSS of one
run (VmHWM reset through /proc/self/clear_refs) minus the RSS before it, with MALLOC_MMAP_THRESHOLD_=131072 so that
freed temporaries go back to the OS and peaks repeat. Time: one process, warm-up rounds, then round-robin timed
rounds (medians).

Usage:
  python bench/bench_qwen_memory.py [--parts floor,interface,eager] [--mem-repeat 3] [--warmup 3] [--repeat 3]
                                    [--no-time] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from bench_memory import MMAP_ENV, _status_kib, part_functions, round_robin  # noqa: E402

PARTS = ("floor", "interface", "eager")
IMAGE_WH = (1024, 768)
TARGET_WORDS = 16
VOCAB = 32000


def build():
    """(explainer, inputs) of the benchmark model, image and target."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    from rgae.adapters.qwen_vl_base import image_text_processor
    from rgae.methods import RGAE
    from tests.families.tiny_qwen_vl import CHAT_TEMPLATE  # a minimal ChatML template with Qwen's vision tokens

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials) - 2)] + ["user", "assistant"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_tokens(specials[2:], special_tokens=True)
    processor = image_text_processor(Qwen2VLProcessor, Qwen2VLImageProcessorPil(), tok, CHAT_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.requires_grad_(False)
    w, h = IMAGE_WH
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    explainer = RGAE(model, processor)
    target = " ".join(f"w{20000 + i}" for i in range(TARGET_WORDS))
    inputs = explainer.prepare(image, target, "w1 w2 w3 w4")
    return explainer, inputs


def describe(inputs) -> dict:
    grid = inputs.extra["image_grid_thw"][0].tolist()
    return {"image_wh": list(IMAGE_WH), "image_grid_thw": grid, "patches": grid[1] * grid[2],
            "image_tokens": inputs.layout.n_tokens, "sequence": int(inputs.input_ids.shape[1]),
            "target_tokens": int(inputs.target_ids.numel())}


def run_memory(part: str) -> dict:
    """Peak RSS growth of one run of ``part`` in this (fresh) process, after one warm-up run."""
    explainer, inputs = build()
    fn = part_functions(explainer, inputs, None)[part]
    fn()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    fn()
    return {"part": part, "peak_mib": (_status_kib("VmHWM") - base) / 1024, **describe(inputs)}


def run_times(parts: list[str], warmup: int, repeat: int) -> dict:
    explainer, inputs = build()
    return round_robin(part_functions(explainer, inputs, None), parts, "cpu", warmup, repeat)


def _child(extra: list[str], env: dict) -> tuple[dict | None, str]:
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True,
                         env={**os.environ, **env})
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return None, f"failed (exit {out.returncode}: {tail[:160]})"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--mem-repeat", type=int, default=3, help="fresh processes per part for the memory median")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-time", action="store_true", help="peak memory only")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if sorted(set(parts) - set(PARTS)):
        print(f"bench_qwen_memory: unknown parts {sorted(set(parts) - set(PARTS))} (known: {', '.join(PARTS)})",
              file=sys.stderr)
        return 2
    if args.child == "memory":
        print(json.dumps(run_memory(parts[0])))
        return 0
    if args.child == "time":
        print(json.dumps(run_times(parts, args.warmup, args.repeat)))
        return 0
    results: dict = {"parts": {}}
    for part in parts:
        peaks, err = [], ""
        for _ in range(args.mem_repeat):
            mem, err = _child(["--child", "memory", "--parts", part], MMAP_ENV)
            if mem is None:
                break
            results.setdefault("shape", {k: v for k, v in mem.items() if k not in ("part", "peak_mib")})
            peaks.append(mem["peak_mib"])
        row = {"peak_mib": statistics.median(peaks), "peaks_mib": peaks} if peaks else {"error": err}
        results["parts"][part] = row
        print(f"{part:9s} peak " + (f"+{row['peak_mib']:.0f} MiB  runs {[round(v) for v in peaks]}" if peaks else err),
              flush=True)
    timed = [part for part in parts if "peak_mib" in results["parts"][part]]
    if not args.no_time and timed:
        times, err = _child(["--child", "time", "--parts", ",".join(timed), "--warmup", str(args.warmup),
                             "--repeat", str(args.repeat)], {"TQDM_DISABLE": "1"})
        for part in timed:
            if times:
                results["parts"][part].update(times[part])
                print(f"{part:9s} median {times[part]['median_s']:.2f} s  "
                      f"runs {[round(t, 2) for t in times[part]['times_s']]}", flush=True)
            else:
                results["parts"][part]["time_error"] = err
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict) -> str:
    """A Markdown table: peak MiB and median time per part, and the ratios to the floor."""
    shape = results.get("shape", {})
    lines = [f"{shape.get('image_wh')} image -> {shape.get('patches')} patches, {shape.get('image_tokens')} image "
             f"tokens, n = {shape.get('sequence')}, {shape.get('target_tokens')}-token target", "",
             "| part | peak MiB (median) | time s (median) | peak / floor | time / floor |", "|---|---|---|---|---|"]
    floor = results["parts"].get("floor", {})
    for part, row in results["parts"].items():
        if "peak_mib" not in row:
            lines.append(f"| {part} | failed | - | - | - |")
            continue
        t = f"{row['median_s']:.2f}" if "median_s" in row else "-"
        mem_ratio = f"{row['peak_mib'] / floor['peak_mib']:.2f}x" if floor.get("peak_mib") else "-"
        time_ratio = (f"{row['median_s'] / floor['median_s']:.2f}x" if "median_s" in row and floor.get("median_s")
                      else "-")
        lines.append(f"| {part} | {row['peak_mib']:.0f} | {t} | {mem_ratio} | {time_ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

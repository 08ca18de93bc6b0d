"""Peak memory and time of R-GAE's two captures against the gradient floor, over sequence length.

Model (``--preset mid``, default): a random LLaVA-style stock Llava, LLM Llama hidden 512 x 8 layers x 8 heads
(intermediate 1376, vocab 32000), ViT CLIP hidden 256 x 4 layers (96 px / 8 px = 144 image tokens), MLP projector,
sdpa attention, parameters frozen; the prompt is padded with words to each sequence length (512, 1024, 2048, 4096 by
default), the last 16 tokens are the target. ``--preset llava7b``: LLaVA-1.5-7B-shaped (LLM hidden 4096 x 32 layers
x 32 heads, intermediate 11008; ViT 1024 x 24 layers, 336 px / 14 px = 576 image tokens), a 20-token caption, one
length (652 tokens); meant for ``--device cuda --dtype bfloat16``.

Parts:
  floor      one sdpa forward with grad, then one autograd.grad per target token of its logit w.r.t. every LLM
             layer's attention output (the o_proj input); no rgae (plain hooks), parameters frozen
  interface  RGAE.compute, capture="interface" (the default): the model's sdpa kernel, probabilities recomputed in
             chunks from q/k and dy/dO, streamed into the row trick
  eager      RGAE.compute, capture="eager": eager attention, every probability tensor recorded with its graph

Peak memory: one process per (part, length); after one warm-up run, CPU: the peak RSS (VmHWM, reset through
/proc/self/clear_refs) minus the RSS before the measured run, with MALLOC_MMAP_THRESHOLD_=131072 so that freed
temporaries go back to the OS and peaks repeat; CUDA: max_memory_allocated minus memory_allocated before the run.
Time: one process per length (glibc's default allocator), warm-up rounds, then round-robin timed rounds over the
parts (load changes hit every part alike); medians; ratios from the same run. A part that fails (e.g. out of
memory) is reported as such.

Usage:
  python bench/bench_memory.py [--lengths 512,1024,2048,4096] [--parts floor,interface,eager] [--warmup 3]
                               [--repeat 5] [--device cpu|cuda] [--dtype float32] [--skip eager@4096] [--json out]
  python bench/bench_memory.py --preset llava7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("floor", "interface", "eager")
PRESETS = {
    "mid": {
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8),
        "vit": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=96, patch_size=8),
        "target": 16,
        "lengths": [512, 1024, 2048, 4096],
    },
    "llava7b": {
        "llm": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32),
        "vit": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
        "target": 20,
        "lengths": [652],
    },
}
VOCAB = 32000
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1"}


def build(preset: str, length: int, device: str, dtype: str):
    """(explainer, inputs) for one preset and sequence length: prompt + target = ``length`` tokens."""
    import numpy as np
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

    from rgae.methods import RGAE

    spec = PRESETS[preset]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vit = spec["vit"]
    image_tokens = (vit["image_size"] // vit["patch_size"]) ** 2
    v = CLIPVisionConfig(**vit)
    t = LlamaConfig(**spec["llm"], vocab_size=len(tok), max_position_embeddings=max(8192, 2 * length))
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(torch_dtype).eval()
    model.requires_grad_(False)
    ip = CLIPImageProcessorPil(size={"shortest_edge": vit["image_size"]},
                               crop_size={"height": vit["image_size"], "width": vit["image_size"]})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vit["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")
    n_target = spec["target"]
    n_words = length - n_target - image_tokens - 2  # "USER:" <image tokens> words "ASSISTANT:" target
    if n_words < 1:
        raise SystemExit(f"length {length} is too short for {image_tokens} image tokens and a {n_target}-token target")
    prompt = "USER: <image>\n" + " ".join(f"w{i % 20000}" for i in range(n_words)) + " ASSISTANT:"
    target = " ".join(f"w{20000 + i}" for i in range(n_target))
    image = np.random.default_rng(0).integers(0, 256, (vit["image_size"], vit["image_size"], 3), dtype=np.uint8)
    explainer = RGAE(model, proc)
    inputs = explainer.prepare(image, target, prompt)
    if inputs.input_ids.shape[1] != length:
        raise SystemExit(f"built {inputs.input_ids.shape[1]} tokens instead of {length}")
    return explainer, inputs


def part_functions(explainer, inputs, grad_batch) -> dict:
    import torch

    def floor():
        outputs, handles = [], []

        def keep(module, args):
            x = args[0]
            if not x.requires_grad:  # frozen parameters: the graph starts at the first attention output
                x = x.detach().requires_grad_(True)
            outputs.append(x)
            return (x, *args[1:])

        for attn in explainer.adapter.llm_attention:
            handles.append(attn.o_proj.register_forward_pre_hook(keep))
        try:
            with torch.enable_grad():
                logits, offset = explainer.forward(inputs)
                target = explainer.target_logits(logits, inputs, offset)
                for t in range(target.numel()):
                    torch.autograd.grad(target[t], outputs, retain_graph=True)
        finally:
            for h in handles:
                h.remove()

    return {
        "floor": floor,
        "interface": lambda: explainer.compute(inputs, capture="interface", grad_batch=grad_batch),
        "eager": lambda: explainer.compute(inputs, capture="eager", grad_batch=grad_batch),
    }


def sync_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run_memory(preset, part, length, device, dtype, grad_batch) -> dict:
    """Peak memory growth of one run of ``part`` (own process, after one warm-up run)."""
    import torch

    explainer, inputs = build(preset, length, device, dtype)
    fn = part_functions(explainer, inputs, grad_batch)[part]
    fn()  # warm-up: one-time allocations (thread pools, kernels, CUDA context) are not the part's memory
    gc.collect()
    sync_device(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync_device(device)
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        how = "max_memory_allocated"
    else:
        try:  # reset VmHWM to the current RSS (Linux), so the peak is this run's
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        base = _status_kib("VmRSS")
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        if reset and base is not None:
            peak_mib = (_status_kib("VmHWM") - base) / 1024
            how = "VmHWM - VmRSS"
        else:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max) / 1024
            how = "ru_maxrss growth"
    return {"part": part, "length": length, "peak_mib": peak_mib, "memory": how}


def round_robin(fns: dict, parts: list[str], device: str, warmup: int, repeat: int) -> dict:
    """Interleaved timing in one process: warm-up rounds, then timed rounds over the parts (so load changes hit
    every part alike); ``{part: {"median_s", "times_s"}}``."""
    for _ in range(warmup):
        for part in parts:
            fns[part]()
    sync_device(device)
    times: dict[str, list[float]] = {part: [] for part in parts}
    for _ in range(repeat):
        for part in parts:
            start = time.perf_counter()
            fns[part]()
            sync_device(device)
            times[part].append(time.perf_counter() - start)
    return {part: {"median_s": statistics.median(ts), "times_s": ts} for part, ts in times.items()}


def run_times(preset, parts, length, device, dtype, grad_batch, warmup, repeat) -> dict:
    explainer, inputs = build(preset, length, device, dtype)
    return round_robin(part_functions(explainer, inputs, grad_batch), parts, device, warmup, repeat)


def _child(args, extra: list[str], env: dict) -> tuple[dict | None, str]:
    cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
           *(["--grad-batch", str(args.grad_batch)] if args.grad_batch is not None else []), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return None, f"failed (exit {out.returncode}: {tail[:120]})"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default: the preset's)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--grad-batch", type=int, default=None, help="RGAE grad_batch (default: the library's)")
    p.add_argument("--skip", default="", help="part@length pairs not to run, e.g. eager@4096")
    p.add_argument("--no-time", action="store_true", help="peak memory only")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child == "memory":
        print(json.dumps(run_memory(args.preset, args.part, args.length, args.device, args.dtype, args.grad_batch)))
        return 0
    if args.child == "time":
        parts = args.parts.split(",")
        print(json.dumps(run_times(args.preset, parts, args.length, args.device, args.dtype, args.grad_batch,
                                   args.warmup, args.repeat)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else PRESETS[args.preset]["lengths"]
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench_memory: unknown parts {unknown} (known: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "lengths": {}}
    for n in lengths:
        row = results["lengths"].setdefault(str(n), {})
        for part in parts:
            if f"{part}@{n}" in skip:
                row[part] = {"skipped": True}
                print(f"n={n:5d} {part:9s} skipped", flush=True)
                continue
            mem, err = _child(args, ["--child", "memory", "--part", part, "--length", str(n)], MMAP_ENV)
            row[part] = mem or {"error": err}
            print(f"n={n:5d} {part:9s} peak " + (f"+{mem['peak_mib']:.0f} MiB" if mem else err), flush=True)
        timed = [part for part in parts if "peak_mib" in row[part]]
        if not args.no_time and timed:
            extra = ["--child", "time", "--length", str(n), "--parts", ",".join(timed), "--warmup",
                     str(args.warmup), "--repeat", str(args.repeat)]
            times, err = _child(args, extra, {"TQDM_DISABLE": "1"})  # glibc's default allocator, as users run
            for part in timed:
                if times:
                    row[part].update(times[part])
                    print(f"n={n:5d} {part:9s} median {times[part]['median_s']:.3f} s  "
                          f"runs {[round(t, 3) for t in times[part]['times_s']]}", flush=True)
                else:
                    row[part]["time_error"] = err
                    print(f"n={n:5d} {part:9s} time {err}", flush=True)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _ratio(row, a, b, key) -> str:
    if key in row.get(a, {}) and key in row.get(b, {}) and row[b][key] > 0:
        return f"{row[a][key] / row[b][key]:.2f}x"
    return "-"


def table(results: dict) -> str:
    """A Markdown table of one run's results."""
    lines = ["| n | floor MiB / s | interface MiB / s | eager MiB / s | interface / floor (mem, time) | "
             "eager / interface (mem) |", "|---|---|---|---|---|---|"]
    for n, row in results["lengths"].items():
        cells = []
        for part in PARTS:
            r = row.get(part, {})
            if "peak_mib" in r:
                time_s = f" / {r['median_s']:.2f}" if "median_s" in r else ""
                cells.append(f"{r['peak_mib']:.0f}{time_s}")
            else:
                cells.append("skipped" if r.get("skipped") else ("not run" if not r else "failed"))
        ratios = (f"{_ratio(row, 'interface', 'floor', 'peak_mib')}, {_ratio(row, 'interface', 'floor', 'median_s')}"
                  f" | {_ratio(row, 'eager', 'interface', 'peak_mib')}")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

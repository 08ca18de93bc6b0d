"""Training: config/overrides, shipped recipe configs, both stages end to end on generated data, checkpoint safety,
logging/curves, the CLI, 2-process CPU training and kill-and-resume (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from deco_models.train import TrainConfig, parse_overrides
from deco_models.train import checkpoints as ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deco_models" / "configs"
COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}

# A model builder the subprocess runs import by name (config model.builder); `delay` slows every forward so a test
# can kill the run between two checkpoints.
BUILDER = '''
import time


def build(projector="avgpool2_4", delay=0.0):
    from tests.tiny import tiny_deco_model, tiny_processor

    model = tiny_deco_model(projector)
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return model, tiny_processor(model)
'''


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    """8 captioned coloured squares (LLaVA JSON + image folder) and a 4-record instruction set with a text-only one."""
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    captions, chats = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        for j, size in enumerate(((40, 24), (24, 40))):
            Image.new("RGB", size, rgb).save(root / "images" / f"{name}{j}.png")
            captions.append({"id": f"{name}{j}", "image": f"{name}{j}.png", "conversations": [
                {"from": "human", "value": "<image>\ndescribe the picture ."},
                {"from": "gpt", "value": f"a {name} square"}]})
        chats.append({"id": f"q{i}", "image": f"{name}0.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the square ?"}, {"from": "gpt", "value": name}]})
    chats.append({"id": "text", "conversations": [{"from": "human", "value": "what shape has three corners ?"},
                                                  {"from": "gpt", "value": "a triangle"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chats) + "\n")
    (root / "tinybuild.py").write_text(BUILDER)
    return root


def tiny(projector: str = "avgpool2_4"):
    from tests.tiny import tiny_deco_model, tiny_processor

    model = tiny_deco_model(projector)
    return model, tiny_processor(model)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def losses(path) -> list[float]:
    return [float(row["loss"]) for row in read_csv(path)]


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["deco_models.train", "deco_models.train.config", "deco_models.train.checkpoints",
                                  "deco_models.train.callbacks", "deco_models.train.curves",
                                  "deco_models.train.recipes", "deco_models.data.llava"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_overrides_parse_and_apply():
    assert parse_overrides(["--train.lr", "1e-4", "lora.r=8", "--train.bf16", "--train.max_steps", "-1"]) == {
        "train.lr": 1e-4, "lora.r": 8, "train.bf16": True, "train.max_steps": -1}
    config = TrainConfig.from_dict({"train": {"output_dir": "o"}})
    config = config.with_overrides(["train.lr=2e-5", "data.template=plain"])
    assert config.train.lr == 2e-5 and config.template == "plain"
    with pytest.raises(ValueError, match="valid keys"):
        config.with_overrides(["train.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown section"):
        config.with_overrides(["optim.lr=1"])
    with pytest.raises(ValueError, match="train.stage"):
        TrainConfig.from_dict({"train": {"stage": "pretrain"}})
    # Stage defaults: plain + no LoRA for align, vicuna_v1 + LoRA for finetune.
    finetune = TrainConfig.from_dict({"train": {"stage": "finetune"}})
    assert (finetune.use_lora, finetune.template) == (True, "vicuna_v1")
    assert (TrainConfig().use_lora, TrainConfig().template) == (False, "plain")


SHIPPED = sorted(CONFIGS.glob("*/*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name != "accelerate"], ids=lambda p: p.stem)
def test_shipped_recipe_configs_follow_the_paper(path):
    from deco_models.train.trainer import training_arguments_kwargs

    config = TrainConfig.from_yaml(path)  # unknown keys would raise
    kwargs = training_arguments_kwargs(config)
    assert Path(kwargs["deepspeed"]).is_file()
    assert config.train.warmup_ratio == 0.03 and config.train.lr_scheduler == "cosine"
    gpus = 8
    global_batch = config.train.per_device_batch_size * config.train.gradient_accumulation_steps * gpus
    if path.parent.name == "llava15_7b":
        assert config.model.projector in path.stem
        if config.train.stage == "align":  # Table 4, pretrain column
            assert (global_batch, config.train.lr, config.use_lora, config.template) == (256, 1e-3, False, "plain")
            assert kwargs["deepspeed"].endswith("zero2.json")
        else:  # LLaVA-1.5 LoRA recipe
            assert (global_batch, config.train.lr, config.train.projector_lr) == (128, 2e-4, 2e-5)
            assert (config.lora.r, config.lora.alpha, config.template) == (128, 256, "vicuna_v1")
            assert config.model.pretrained_projector.endswith(f"{config.model.projector}_align")
            assert kwargs["deepspeed"].endswith("zero3.json")
    else:  # PRISM one-stage (Table 5): fresh projector
        assert config.model.pretrained_projector is None and config.train.stage == "finetune"
        assert (global_batch, config.train.lr, config.train.weight_decay) == (128, 2e-5, 0.1)


def test_every_paper_projector_has_both_stages():
    stems = {p.stem for p in SHIPPED}
    for projector in ("mlp2x_gelu", "qformer2_144", "avgpool2_144", "cabstractor_144"):
        assert {f"{projector}_align", f"{projector}_finetune"} <= stems


# Keys from the DeepSpeed configuration reference (https://www.deepspeed.ai/docs/config-json/).
DEEPSPEED_TOP = {"fp16", "bf16", "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                 "gradient_clipping", "zero_optimization", "optimizer", "scheduler", "steps_per_print",
                 "wall_clock_breakdown", "zero_allow_untested_optimizer"}
DEEPSPEED_ZERO = {"stage", "overlap_comm", "contiguous_gradients", "sub_group_size", "reduce_bucket_size",
                  "allgather_partitions", "allgather_bucket_size", "reduce_scatter", "offload_optimizer",
                  "offload_param", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                  "stage3_max_live_parameters", "stage3_max_reuse_distance",
                  "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients"}
DEEPSPEED_FP16 = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                  "consecutive_hysteresis", "min_loss_scale"}


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_use_valid_keys_and_defer_to_the_trainer(name, stage):
    config = json.loads((CONFIGS / "deepspeed" / name).read_text())
    assert set(config) <= DEEPSPEED_TOP
    assert set(config["zero_optimization"]) <= DEEPSPEED_ZERO and config["zero_optimization"]["stage"] == stage
    assert set(config["fp16"]) <= DEEPSPEED_FP16 and set(config["bf16"]) == {"enabled"}
    # "auto": the Trainer fills batch sizes, accumulation, clipping and precision from TrainingArguments, so one
    # JSON serves every recipe; no optimizer/scheduler blocks (the Trainer builds the two-group AdamW + cosine).
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp2_accelerate_config_is_valid_for_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = CONFIGS / "accelerate" / "fsdp2.yaml"
    cluster = load_config_from_file(str(path))
    assert str(cluster.distributed_type).endswith("FSDP")
    assert cluster.fsdp_config["fsdp_version"] == 2
    launch_options = {a.dest for a in launch_command_parser()._actions}
    assert set(cluster.fsdp_config) <= launch_options, set(cluster.fsdp_config) - launch_options


def test_deepspeed_flag_and_dotted_overrides_reach_training_arguments(tmp_path):
    from deco_models.cli import build_parser
    from deco_models.train.trainer import training_arguments_kwargs

    args = build_parser().parse_args(["train", "--config", "c.yaml", "--train.lr", "3e-4", "train.max_steps=7",
                                      "--deepspeed", "deco_models/configs/deepspeed/zero3.json", "--resume"])
    assert args.resume is True and args.deepspeed.endswith("zero3.json")
    overrides = parse_overrides(args.overrides)
    overrides["train.deepspeed"] = args.deepspeed
    config = TrainConfig.from_dict({"train": {"output_dir": str(tmp_path)}}).with_overrides(overrides)
    kwargs = training_arguments_kwargs(config)
    assert (kwargs["learning_rate"], kwargs["max_steps"]) == (3e-4, 7)
    assert kwargs["deepspeed"].endswith("deco_models/configs/deepspeed/zero3.json")
    assert kwargs["warmup_steps"] == 0.03  # transformers 5: a float < 1 is the warmup ratio


# -------------------------------------------------------------------------------------------------- checkpoints


def test_incomplete_checkpoints_are_never_resumed_or_counted(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.mark_complete(tmp_path / "checkpoint-3", 3)
    ckpt.mark_complete(tmp_path / "checkpoint-6", 6)
    # checkpoint-9: killed mid-save (no marker).
    assert ckpt.find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert not (tmp_path / "checkpoint-9").exists()
    assert len(list(tmp_path.glob("incomplete-checkpoint-9-*"))) == 1
    ckpt.rotate_complete_checkpoints(tmp_path, keep=1)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-6"]
    assert ckpt.find_resumable_checkpoint(tmp_path / "missing") is None


# ------------------------------------------------------------------------------------------------------ curves


def test_plot_curves_draws_one_line_per_run(tmp_path):
    from deco_models.train import plot_curves

    paths = []
    for name, scale in (("mlp", 1.0), ("deco", 0.7)):
        path = tmp_path / name / "train_log.csv"
        path.parent.mkdir()
        path.write_text("step,loss,learning_rate\n" + "".join(f"{s},{scale * 4 / s},0.1\n" for s in range(1, 11)))
        paths.append(path)
    figure = plot_curves(paths, ["MLP", "DeCo"], tmp_path / "fig5.png", smoothing=2)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["MLP", "DeCo"]
    assert lines[1].get_ydata()[0] == pytest.approx(2.8)
    assert (tmp_path / "fig5.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="labels"):
        plot_curves(paths, ["one"])
    with pytest.raises(ValueError, match="grad_norm"):
        plot_curves(paths, metric="grad_norm")


# ---------------------------------------------------------------------------------------------- recipes / CLI


def test_recipe_registry_dispatches_from_the_cli():
    from deco_models.cli import main
    from deco_models.train.recipes import RECIPES, get_recipe

    calls = []
    RECIPES["unit-test-recipe"] = lambda overrides, resume: calls.append((overrides, resume))
    try:
        assert main(["train", "--recipe", "unit_test_recipe", "--train.max_steps", "3", "--resume"]) == 0
    finally:
        del RECIPES["unit-test-recipe"]
    assert calls == [({"train.max_steps": 3}, True)]
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("no-such-recipe")


# ---------------------------------------------------------------------------------------------- both stages


def _align_config(data: Path, out: Path, **train) -> dict:
    return {
        "data": {"data_path": str(data / "captions.json"), "image_folder": str(data / "images")},
        "train": {"stage": "align", "output_dir": str(out), "max_steps": 16, "per_device_batch_size": 4,
                  "lr": 2e-2, "save_steps": 8, "report_to": "none", "seed": 0, **train},
    }


def test_align_then_lora_finetune_loss_decreases_and_saves_the_projector(caption_data, tmp_path):
    from peft import PeftModel

    from deco_models.peft_compat import peft_wrapping
    from deco_models.train import train

    # Stage 1: only the projector trains.
    model, processor = tiny()
    vision0, llm0 = snapshot(model.model.vision_tower), snapshot(model.model.language_model)
    projector0 = snapshot(model.model.multi_modal_projector)
    align = train(_align_config(caption_data, tmp_path / "align"), model=model, processor=processor)
    align_losses = losses(align.log_csv)
    assert len(align_losses) == 16 and align.global_step == 16
    assert sum(align_losses[-4:]) / 4 < sum(align_losses[:4]) / 4 - 0.05, align_losses
    assert same(snapshot(model.model.vision_tower), vision0) and same(snapshot(model.model.language_model), llm0)
    assert not same(snapshot(model.model.multi_modal_projector), projector0)
    assert (tmp_path / "align" / "projector.safetensors").is_file()
    assert ckpt.is_complete(tmp_path / "align" / "checkpoint-8")
    aligned = snapshot(model.model.multi_modal_projector)

    # Stage 2: LoRA on the LLM + the aligned projector (modules_to_save), two learning rates.
    model2, _ = tiny()
    config = {
        "model": {"pretrained_projector": str(tmp_path / "align")},
        "data": {"data_path": str(caption_data / "chat.jsonl"), "image_folder": str(caption_data / "images")},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "ft"), "max_steps": 16,
                  "per_device_batch_size": 4, "lr": 2e-2, "projector_lr": 2e-3, "save_steps": 8,
                  "report_to": "none", "seed": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    ft = train(config, model=model2, processor=processor)
    # peft wraps the projector: the frozen original is the aligned one, the trained copy moved on.
    wrapper = model2.model.multi_modal_projector
    assert same(snapshot(wrapper.original_module), aligned)
    assert not same(snapshot(wrapper.modules_to_save["default"]), aligned)
    ft_losses = losses(ft.log_csv)
    assert sum(ft_losses[-4:]) / 4 < sum(ft_losses[:4]) / 4 - 0.1, ft_losses
    rows = read_csv(ft.log_csv)
    assert all(float(r["projector_lr"]) == pytest.approx(float(r["learning_rate"]) / 10) for r in rows)
    assert float(rows[0]["tokens_per_second"]) > 0 and float(rows[0]["samples_per_second"]) > 0

    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "ft" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in adapter) and any("lora_A" in k for k in adapter)
    assert not any("vision_tower" in k for k in adapter)
    # LLaVA's layouts too: mm_projector.bin after align (loadable back), non_lora_trainables.bin after finetune.
    assert (tmp_path / "ft" / "llava_lora" / "non_lora_trainables.bin").is_file()
    llava_projector = torch.load(tmp_path / "align" / "mm_projector.bin", weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in llava_projector)
    from deco_models.train import load_pretrained_projector

    model3, _ = tiny()
    load_pretrained_projector(model3, tmp_path / "align" / "mm_projector.bin")
    assert same(snapshot(model3.model.multi_modal_projector), aligned)

    # The saved adapter alone (on a fresh base model) reproduces the trained model: the projector is inside it.
    fresh, _ = tiny()
    with peft_wrapping():
        reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ft")).eval()
    trained = ft.model.eval()
    batch = next(iter(ft.trainer.get_train_dataloader()))
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trained(**batch).logits, atol=1e-5)


def test_lora_full_train_trains_norms_embeddings_and_head_and_exports_them(caption_data, tmp_path):
    """``lora.full_train``: the matched LLM parameters train in full beside the adapters, the other base weights
    stay frozen, and LLaVA's layout carries them in non_lora_trainables."""
    from deco_models.train import train

    model, processor = tiny()
    llm0 = snapshot(model.model.language_model)
    head0 = model.lm_head.weight.detach().clone()
    config = {
        "data": {"data_path": str(caption_data / "chat.jsonl"), "image_folder": str(caption_data / "images")},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "ft"), "max_steps": 4,
                  "per_device_batch_size": 4, "lr": 1e-2, "save_steps": 100, "report_to": "none", "seed": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "full_train": ["norm", "embed_tokens", "lm_head"]},
    }
    ft = train(config, model=model, processor=processor)
    trainable = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lm_head.weight") for n in trainable)
    assert any("input_layernorm" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    llm1 = {k.replace("base_layer.", ""): v for k, v in snapshot(model.model.language_model).items()
            if "lora_" not in k}
    changed = {k for k in llm0 if not torch.equal(llm0[k], llm1[k])}
    assert changed and all("norm" in k or "embed_tokens" in k for k in changed), changed
    assert not torch.equal(head0, model.lm_head.weight)

    from safetensors.torch import load_file

    non_lora = load_file(tmp_path / "ft" / "llava_lora" / "non_lora_trainables.safetensors")
    assert "base_model.model.lm_head.weight" in non_lora
    assert "base_model.model.model.embed_tokens.weight" in non_lora
    assert "base_model.model.model.layers.0.input_layernorm.weight" in non_lora


def test_lora_full_train_pattern_that_matches_nothing_is_an_error(caption_data, tmp_path):
    from deco_models.train import train

    model, processor = tiny()
    config = {
        "data": {"data_path": str(caption_data / "chat.jsonl"), "image_folder": str(caption_data / "images")},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "ft"), "max_steps": 1,
                  "per_device_batch_size": 4, "report_to": "none"},
        "lora": {"r": 4, "full_train": ["layernrom"]},
    }
    with pytest.raises(ValueError, match="layernrom"):
        train(config, model=model, processor=processor)


def test_one_stage_full_finetune_from_a_fresh_projector(caption_data, tmp_path):
    from deco_models.train import train

    model, processor = tiny("mlp2x_gelu")
    vision0, llm0 = snapshot(model.model.vision_tower), snapshot(model.model.language_model)
    result = train({
        "data": {"data_path": str(caption_data / "chat.jsonl"), "image_folder": str(caption_data / "images")},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "prism"), "max_steps": 3,
                  "per_device_batch_size": 2, "lr": 1e-3, "weight_decay": 0.1, "save_steps": 100,
                  "report_to": "none", "gradient_checkpointing": True},
        "lora": {"enable": False},
    }, model=model, processor=processor)
    assert result.global_step == 3
    assert same(snapshot(model.model.vision_tower), vision0)  # vision encoder frozen by default
    assert not same(snapshot(model.model.language_model), llm0)  # the LLM itself trains (no LoRA)


def test_model_sources_pretrained_parts_and_saved_model(caption_data, tmp_path):
    """LLaVA's start (a saved vision encoder + a saved LLM + a fresh projector), and a saved deco model."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from deco_models.train import build_model, train
    from tests.tiny import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "clip")
    tiny_image_processor().save_pretrained(tmp_path / "clip")
    llm = LlamaForCausalLM(tiny_text_config())
    llm.save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    config = TrainConfig.from_dict({
        "model": {"vision_name_or_path": str(tmp_path / "clip"), "llm_name_or_path": str(tmp_path / "llm"),
                  "projector": "cabstractor_4"},
        **_align_config(caption_data, tmp_path / "parts", max_steps=2)})
    model, processor = build_model(config)
    assert model.config.projector_type == "cabstractor_4" and processor.num_image_tokens == 4
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    result = train(config, model=model, processor=processor)
    assert result.global_step == 2

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    again = train(_align_config(caption_data, tmp_path / "from_saved", max_steps=1)
                  | {"model": {"name_or_path": str(tmp_path / "saved")}})
    assert again.model.config.projector_type == "cabstractor_4"


def test_align_resume_from_a_projector_only_checkpoint(caption_data, tmp_path):
    """Align checkpoints hold only the trained tensors (trainable.safetensors); resuming from one reproduces the
    uninterrupted run (same process, so bit-identical)."""
    from deco_models.train import train

    config = _align_config(caption_data, tmp_path / "run", max_steps=4, save_steps=2)
    model, processor = tiny()
    full = train(config, model=model, processor=processor)
    full_losses = losses(full.log_csv)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["projector.safetensors",
                                                                        "trainable.safetensors"]
    fresh, _ = tiny()
    resumed = train(config, model=fresh, processor=processor, resume=str(checkpoint))
    assert resumed.resumed_from == str(checkpoint) and resumed.global_step == 4
    assert losses(resumed.log_csv) == pytest.approx(full_losses, rel=1e-6)
    assert same(snapshot(fresh.model.multi_modal_projector), snapshot(model.model.multi_modal_projector))


def test_bad_image_in_the_data_is_skipped_and_reported(caption_data, tmp_path):
    from deco_models.train import train

    records = json.loads((caption_data / "captions.json").read_text())
    records.append({**records[0], "id": "ghost", "image": "ghost.png"})
    (tmp_path / "with_ghost.json").write_text(json.dumps(records))
    config = _align_config(caption_data, tmp_path / "out", max_steps=2)
    config["data"]["data_path"] = str(tmp_path / "with_ghost.json")
    model, processor = tiny()
    result = train(config, model=model, processor=processor)
    assert list(result.skipped_images) == ["ghost"] and "ghost.png" in result.skipped_images["ghost"]
    config["data"]["on_bad_image"] = "error"
    with pytest.raises(ValueError, match="ghost"):
        train(config, model=model, processor=processor)


# ----------------------------------------------------------------------------------------------- subprocesses


def _write_config(path: Path, data: Path, out: Path, max_steps: int, delay: float = 0.0, save_steps: int = 3):
    path.write_text(textwrap.dedent(f"""
        model: {{builder: "tinybuild:build", builder_kwargs: {{delay: {delay}}}}}
        data: {{data_path: {data / 'chat.jsonl'}, image_folder: {data / 'images'}}}
        train: {{stage: finetune, output_dir: {out}, max_steps: {max_steps}, per_device_batch_size: 2,
                lr: 1.0e-2, projector_lr: 1.0e-3, save_steps: {save_steps}, save_total_limit: 2, report_to: none,
                seed: 0}}
        lora: {{r: 4, alpha: 8, dropout: 0.1}}
    """))
    return path


def _env(data: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{data}", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _deco_train(*args) -> list[str]:
    return [sys.executable, "-m", "deco_models.cli", "train", *map(str, args)]


def _run(command: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run in its own process group and kill the whole group on timeout (torchrun workers included)."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} timed out after {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_process_cpu_run_trains_and_saves(caption_data, tmp_path):
    config = _write_config(tmp_path / "ddp.yaml", caption_data, tmp_path / "ddp", max_steps=4, save_steps=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deco_models.cli", "train", "--config", str(config)]
    done = _run(command, _env(caption_data))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ddp"
    assert (out / "adapter_model.safetensors").is_file() and ckpt.is_complete(out / "checkpoint-4")
    rows = read_csv(out / "train_log.csv")
    assert len(rows) == 4  # one writer (rank 0)
    # 5 records, 2 processes x batch 2 = 4 per step: an epoch is 2 steps (1.25 -> ceil); one process would need 3.
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(2.0)
    assert (out / "checkpoint-4" / "rng_state_1.pth").is_file()  # the second rank saved its RNG state


@pytest.mark.slow
def test_kill_and_resume_reaches_the_uninterrupted_loss(caption_data, tmp_path):
    """SIGKILL a run after its first complete checkpoint, plant a half-written later checkpoint, resume: the final
    loss equals the uninterrupted run's (same seed, same data order, restored RNG/optimizer/scheduler).
    Tolerance: 1e-5 relative (CPU, one thread: in practice bit-identical)."""
    env = _env(caption_data)
    steps = 9
    reference = _write_config(tmp_path / "ref.yaml", caption_data, tmp_path / "ref", steps)
    killed_out = tmp_path / "killed"
    killed = _write_config(tmp_path / "killed.yaml", caption_data, killed_out, steps, delay=0.4)

    process = subprocess.Popen(_deco_train("--config", killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    # The uninterrupted reference runs meanwhile (same seed and data; no delay, which changes no number).
    reference_process = subprocess.Popen(_deco_train("--config", reference), cwd=REPO, env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ckpt.is_complete(killed_out / "checkpoint-3"):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _, reference_stderr = reference_process.communicate(timeout=400)
    finally:
        for running in (process, reference_process):
            if running.poll() is None:
                os.killpg(running.pid, signal.SIGKILL)
                running.wait()
    reference_run = subprocess.CompletedProcess([], reference_process.returncode, "", reference_stderr)
    assert reference_run.returncode == 0, reference_run.stderr[-3000:]
    assert not (killed_out / "adapter_model.safetensors").exists()  # it really died before the end
    # A save killed half way: the folder exists, the files are partial, there is no completion marker.
    half = killed_out / "checkpoint-8"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"partial")

    resumed = _run(_deco_train("--config", reference, "--train.output_dir", killed_out, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not half.exists() and list(killed_out.glob("incomplete-checkpoint-8-*"))
    reference_losses, resumed_losses = losses(tmp_path / "ref" / "train_log.csv"), losses(killed_out / "train_log.csv")
    assert len(resumed_losses) == steps  # rows past the resumed checkpoint were rewritten, not duplicated
    assert resumed_losses[-1] == pytest.approx(reference_losses[-1], rel=1e-5)
    assert resumed_losses == pytest.approx(reference_losses, rel=1e-5)

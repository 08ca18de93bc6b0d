"""Every file the project writes gets the umask's normal permissions (0666 & ~umask: 0644 under umask 022), not the
owner-only 0600 of ``mkstemp``: the atomic writer, explanations, figures, the demo's summary and figures, eval
results, converted checkpoints and a training run (Trainer checkpoints, adapters, LLaVA exports, merged model)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rgae.io import atomic_write

UMASKS = [0o022, 0o027]


@pytest.fixture(params=UMASKS, ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes_under(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file and folder below ``root`` (root itself excluded)."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


def assert_normal_modes(root: Path, umask: int, min_files: int = 1) -> None:
    modes = modes_under(root)
    files = {p: m for p, m in modes.items() if (root / p).is_file()}
    assert len(files) >= min_files, sorted(modes)
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o666 if (root / p).is_file() else 0o777) & ~umask}
    assert not wrong, f"not {oct(0o666 & ~umask)} (files) / {oct(0o777 & ~umask)} (folders) under umask " \
                      f"{oct(umask)}: {wrong}"
    assert not [p for p in modes if p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp")]  # no leftovers


def test_atomic_write_new_and_replaced_files(tmp_path, umask):
    out = tmp_path / "out"
    path = atomic_write(out / "a.txt", lambda tmp: Path(tmp).write_text("one"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask and path.read_text() == "one"
    # A file that was owner-only (written by the old mkstemp writer) is replaced by a normal one.
    path.chmod(0o600)
    atomic_write(path, lambda tmp: Path(tmp).write_text("two"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask and path.read_text() == "two"
    assert_normal_modes(out, umask)


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path, umask):
    path = atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("old"))

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_umask_is_never_changed_by_a_write(tmp_path, umask):
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    current = os.umask(0o077)
    os.umask(current)
    assert current == umask


def test_explanation_and_figures(tmp_path, umask):
    from rgae import Explanation, viz

    e = viz.synthetic_explanation()
    e.save(tmp_path / "out" / "expl")
    viz.save_figures(e, tmp_path / "out" / "figs", formats=("png", "pdf", "svg"), dpi=30, words=False)
    assert_normal_modes(tmp_path / "out", umask, min_files=2 + 18)
    assert Explanation.load(tmp_path / "out" / "expl").words == e.words


def test_demo_summary_and_figures(tmp_path, umask):
    from rgae.commands.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, models=["tiny-avgpool2_36"], methods=["rgae"], progress=False, dpi=30)
    assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
    assert_normal_modes(out, umask, min_files=5)


def test_eval_results_and_converted_checkpoint(tmp_path, umask):
    from deco_models.cli import main

    data = tmp_path / "in"
    data.mkdir()
    (data / "q.jsonl").write_text('{"question_id": 1, "text": "Is there a dog?", "label": "yes"}\n')
    (data / "a.jsonl").write_text('{"question_id": 1, "text": "Yes"}\n')
    out = tmp_path / "out"
    assert main(["eval", "--task", "pope", "--data", str(data / "q.jsonl"), "--predictions",
                 str(data / "a.jsonl"), "--out", str(out / "pope.json")]) == 0
    assert json.loads((out / "pope.json").read_text())["metrics"]["accuracy"] == 1.0
    assert main(["convert", "shapes-mini-avgpool2_36", str(out / "converted")]) == 0
    assert (out / "converted" / "model.safetensors").is_file()
    assert_normal_modes(out, umask, min_files=4)


def test_training_run_outputs(tmp_path, umask):
    """A LoRA finetune with a Trainer checkpoint, the LLaVA LoRA export and a merged model: every file it writes."""
    from deco_models.train import train
    from tests.tiny import tiny_deco_model, tiny_processor

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((24, 40, 3), (230, 20, 20), np.uint8)).save(data / "red.png")
    record = {"id": "r", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the square ?"}, {"from": "gpt", "value": "red"}]}
    (data / "chat.json").write_text(json.dumps([record] * 4))
    torch.manual_seed(0)
    model = tiny_deco_model("avgpool2_4")
    out = tmp_path / "run"
    train({"data": {"data_path": str(data / "chat.json"), "image_folder": str(data)},
           "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 2, "per_device_batch_size": 2,
                     "lr": 1e-2, "save_steps": 2, "report_to": "none", "seed": 0, "save_merged": True},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
          model=model, processor=tiny_processor(model))
    modes = modes_under(out)
    for written in ("checkpoint-2/optimizer.pt", "checkpoint-2/trainer_state.json", "adapter_model.safetensors",
                    "train_log.csv", "train_config.yaml", "llava_lora/non_lora_trainables.bin",
                    "merged/model.safetensors"):
        assert written in modes, sorted(modes)
    assert_normal_modes(out, umask, min_files=10)

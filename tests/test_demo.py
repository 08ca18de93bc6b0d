"""``rgae demo``: the empty-zoo message, the ground-truth word matching, and (slow) the whole demo on tiny random
models through the real command line."""

from __future__ import annotations

import json

import pytest
import torch

from rgae import Explanation
from rgae.cli import main
from rgae.commands import demo


def test_empty_zoo_fails_with_training_instructions(monkeypatch, tmp_path, capsys):
    from deco_models import zoo

    monkeypatch.setattr(zoo, "available", lambda: [])
    assert main(["demo", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "deco train --recipe shapes-mini" in err and "--tiny" in err
    assert not (tmp_path / "out").exists()


def test_unique_word_boxes_follow_caption_objects():
    scene = demo.demo_scene()
    from deco_models.data.shapes import caption

    words = caption(scene).split()
    e = Explanation(method="rgae", target_text=caption(scene), output_tokens=words,
                    text_to_patch=torch.zeros(len(words), 4), patch_grid=(2, 2))
    pairs = demo.unique_word_boxes(e, scene)
    # Seed 2: "a large yellow square left of a large blue circle left of a small red triangle" - all unique.
    assert [w for _, w, _ in pairs] == ["yellow", "square", "blue", "circle", "red", "triangle"]
    assert [words[i] for i, _, _ in pairs] == ["yellow", "square", "blue", "circle", "red", "triangle"]
    assert pairs[0][2] == scene.objects[0].box and pairs[-1][2] == scene.objects[2].box


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_demo(tmp_path, models=["tiny-mlp2x_gelu"], methods=["lime"], progress=False)


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "rgae-demo"
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"tiny-mlp2x_gelu", "tiny-avgpool2_36"}
    for name, entry in summary["models"].items():
        for image in ("shapes", "photo"):
            assert set(entry["images"][image]) == {"rgae", "rawattn", "rollout", "gradcam"}
        for record in entry["images"]["shapes"].values():
            assert record["pointing_total"] == 6 and 0 <= record["pointing_hits"] <= 6
            assert len(record["top_words"]) == 3 and record["seconds"] > 0
        assert 0 < entry["random_pointing"] < 1
        for image in ("shapes", "photo"):
            assert (out / f"comparison-{image}-{name}.png").stat().st_size > 1000
            folder = out / name / image
            assert any(p.name.startswith("decomposition-rgae-") for p in folder.iterdir())
            assert any(p.name.startswith("R_t_i-rgae-") for p in folder.iterdir())
    assert (out / "projectors-shapes.png").is_file() and (out / "projectors-photo.png").is_file()
    assert (out / "index.html").read_text().count('class="rgae-explore"') == 3  # scene + a photo per model
    md = (out / "summary.md").read_text()
    assert "| tiny-avgpool2_36 | rgae |" in md and "random" in md
    assert summary["figures"] == len(list(out.rglob("*.png")))


@pytest.mark.slow
def test_shapes_table_smoke(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "shapes_table.py"
    spec = importlib.util.spec_from_file_location("shapes_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "table.md"
    assert module.main(["--tiny", "--scenes", "2", "--models", "tiny-avgpool2_36", "--out", str(out),
                        "--no-progress"]) == 0
    table = out.read_text()
    assert "| tiny-avgpool2_36 | 36 |" in table and "PG rgae" in table and "PG random" in table
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert 0 <= row["caption"] <= 1 and 0 <= row["grounding_acc50"] <= 1 and "f1" in row["pope"]
    assert row["pointing"]["n_words"] > 0 and 0 < row["pointing"]["random"] < 1
    assert "| tiny-avgpool2_36 |" in capsys.readouterr().out

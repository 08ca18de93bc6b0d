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
    assert err.startswith("rgae demo: error: no shapes-mini models are installed") and err.count("\n") == 1
    assert "deco train --recipe shapes-mini" in err and "rgae demo --tiny" in err
    assert not (tmp_path / "out").exists()


def test_models_are_checked_before_any_work():
    assert demo.check_models(None, tiny=True) == ["tiny-mlp2x_gelu", "tiny-avgpool2_36"]
    assert demo.check_models(["tiny-qformer2_36"]) == ["tiny-qformer2_36"]
    with pytest.raises(ValueError, match="unknown model\\(s\\) nope, tiny-blob; known: shapes-mini-avgpool2_36"):
        demo.check_models(["nope", "tiny-blob", "tiny-mlp2x_gelu"])


def test_comparison_columns_are_every_scored_word():
    """The grid shows the sentence and every color/shape word the summary scores: all six in the demo scene."""
    from deco_models.data.shapes import caption

    scene = demo.demo_scene()
    words = caption(scene).split()
    e = Explanation(method="rgae", target_text=caption(scene), output_tokens=words,
                    text_to_patch=torch.zeros(len(words), 4), patch_grid=(2, 2))
    columns = demo._comparison_words(e, scene)
    assert columns[0] is None and [words[i] for i in columns[1:]] == [w for _, w, _ in demo.unique_word_boxes(e, scene)]
    assert "triangle" in [words[i] for i in columns[1:]] and len(columns) == 7


def test_summary_reports_rates_and_the_photo_note(tmp_path):
    record = {"pointing_hits": 4, "pointing_total": 6, "top_words": ["red"], "seconds": 0.5}
    summary = {"prompt": "p", "scene_seed": 2, "scene_caption": "c", "methods": ["rgae"], "images": ["shapes", "photo"],
               "photo_note": demo.PHOTO_NOTE, "figures": 3, "total_s": 1.0,
               "models": {"m": {"random_pointing": 0.0625, "images": {
                   "shapes": {"rgae": record}, "photo": {"rgae": {"target": "a cat", "top_words": [], "seconds": 1}}}}}}
    demo._write_summary(tmp_path, summary)
    md = (tmp_path / "summary.md").read_text()
    assert "| m | rgae | 0.67 (4/6) | red | a cat |" in md
    assert "| m | random | 0.06 (expected) |" in md
    assert demo.PHOTO_NOTE in md and "photo: answer (out of domain)" in md
    del summary["photo_note"]
    summary["images"] = ["shapes"]
    demo._write_summary(tmp_path, summary)
    assert "photo" not in (tmp_path / "summary.md").read_text().lower()


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
def test_demo_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    from rgae import viz

    notes = []  # every figure of the photo says it is out of domain: spy on the notes the figures get
    for name in ("plot_comparison", "figure_specs"):
        real = getattr(viz, name)
        monkeypatch.setattr(viz, name, lambda *a, _real=real, _name=name, **k: notes.append(
            (_name, k.get("note"))) or _real(*a, **k))
    out = tmp_path / "rgae-demo"
    assert main(["demo", "--tiny", "--photo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"tiny-mlp2x_gelu", "tiny-avgpool2_36"}
    assert summary["images"] == ["shapes", "photo"] and summary["photo_note"] == demo.PHOTO_NOTE
    for name, entry in summary["models"].items():
        for image in ("shapes", "photo"):
            assert set(entry["images"][image]) == {"rgae", "rawattn", "rollout", "gradcam"}
        for record in entry["images"]["shapes"].values():
            assert record["pointing_total"] == 6 and 0 <= record["pointing_hits"] <= 6
            assert record["pointing_rate"] == round(record["pointing_hits"] / 6, 4)
            assert len(record["top_words"]) == 3 and record["seconds"] > 0
        assert all(r["note"] == demo.PHOTO_NOTE for r in entry["images"]["photo"].values())
        assert 0 < entry["random_pointing"] < 1
        for image in ("shapes", "photo"):
            assert (out / f"comparison-{image}-{name}.png").stat().st_size > 1000
            folder = out / name / image
            assert any(p.name.startswith("decomposition-rgae-") for p in folder.iterdir())
            assert any(p.name.startswith("R_t_i-rgae-") for p in folder.iterdir())
    assert (out / "projectors-shapes.png").is_file() and (out / "projectors-photo.png").is_file()
    assert (out / "index.html").read_text().count('class="rgae-explore"') == 3  # scene + a photo per model
    md = (out / "summary.md").read_text()
    assert "| tiny-avgpool2_36 | rgae | " in md and "(expected)" in md and demo.PHOTO_NOTE in md
    assert summary["figures"] == len(list(out.rglob("*.png")))
    # 2 models × (shapes, photo) comparison grids + 2 projector grids; R-GAE's quick figures per model and image.
    from collections import Counter

    assert Counter(n for kind, n in notes if kind == "plot_comparison") == {None: 3, demo.PHOTO_NOTE: 3}
    assert Counter(n for kind, n in notes if kind == "figure_specs") == {None: 2, demo.PHOTO_NOTE: 2}


@pytest.mark.slow
def test_default_demo_leaves_the_photo_out(tmp_path):
    summary = demo.run_demo(tmp_path, models=["tiny-avgpool2_36"], methods=["rawattn"], progress=False, dpi=20)
    assert summary["images"] == ["shapes"] and set(summary["models"]["tiny-avgpool2_36"]["images"]) == {"shapes"}
    assert not list(tmp_path.rglob("*photo*"))


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
    assert row["scenes"]["set"] == "test" and row["scenes"]["n_scenes"] == 2
    for cell in (row["caption"], row["grounding_acc50"], row["pope_f1"], row["pointing"]["rgae"]):
        assert 0 <= cell["low"] <= cell["value"] <= cell["high"] <= 1, cell
    assert row["pope_f1"]["value"] == pytest.approx(row["pope"]["f1"])
    assert row["pointing"]["n_words"] > 0 and 0 < row["pointing"]["random"]["value"] < 1
    assert "| tiny-avgpool2_36 |" in capsys.readouterr().out

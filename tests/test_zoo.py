"""The shipped shapes-mini zoo: registry, offline loading, the quality the models were shipped with, and the recipe
that reproduces them (shortened, end to end)."""

from __future__ import annotations

import json

import pytest

from deco_models import zoo

SHIPPED = zoo.available()
MAX_ZOO_MB = 30


def test_registry_lists_and_resolves_names():
    for name in SHIPPED:
        entry = zoo.resolve(name)
        assert name == f"shapes-mini-{entry.projector}"
        assert (entry.path / "adapter_model.safetensors").is_file()
        assert (entry.base / "vision" / "model.safetensors").is_file()
        assert zoo.is_zoo_name(name)
    with pytest.raises(ValueError, match="available"):
        zoo.resolve("shapes-mini-nonexistent")
    assert not zoo.is_zoo_name("shapes-mini-nonexistent")


def test_shipped_zoo_is_small_and_has_no_pickles():
    root = zoo.FAMILIES["shapes-mini"]
    if not root.is_dir():
        pytest.skip("no models shipped in this checkout")
    files = [f for f in root.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) / 1e6 <= MAX_ZOO_MB
    # Weights in safetensors only (LLaVA's non_lora_trainables.bin is loadable weights-only, never required).
    assert not [f for f in files if f.suffix in (".pkl", ".pickle")]


def test_shipped_tokenizer_is_the_recipes_and_round_trips_boxes():
    """Issue 15: the shipped decoder gave "[ 0. 26, 0. 55, ... ]"; the shipped file is now exactly what the recipe's
    build_tokenizer writes (a retrain ships the same), and boxes decode to themselves."""
    from transformers import PreTrainedTokenizerFast

    from deco_models.recipes.shapes_mini import build_tokenizer

    folder = zoo.FAMILIES["shapes-mini"] / "base" / "llm"
    if not folder.is_dir():
        pytest.skip("no models shipped in this checkout")
    shipped = json.loads((folder / "tokenizer.json").read_text())
    assert shipped == json.loads(build_tokenizer().backend_tokenizer.to_str())
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))  # as deco_models.load reads it
    box = "[0.26, 0.55, 0.40, 0.71]"
    assert tok.decode(tok(box)["input_ids"], skip_special_tokens=True) == box
    assert tok.batch_decode([tok(box)["input_ids"]], skip_special_tokens=True) == [box]


def test_recipe_is_registered():
    from deco_models.train.recipes import get_recipe

    assert get_recipe("shapes-mini") is get_recipe("shapes_mini")


def _test_metrics(name) -> dict:
    return zoo.resolve(name).metrics["test"]


def test_every_shipped_model_records_test_and_validation_numbers_with_intervals():
    from deco_models.eval import intervals
    from deco_models.recipes.shapes_mini import SCENE_SETS

    for name in SHIPPED:
        metrics = zoo.resolve(name).metrics
        for section in ("validation", "test"):
            scenes = metrics[section]["scenes"]
            assert (scenes["set"], scenes["seed"]) == (section, SCENE_SETS[section].seed)
            assert metrics[section]["bootstrap"]["resamples"] == intervals.RESAMPLES
            low, high = metrics[section]["caption_word_accuracy"]["color_shape_interval"]
            assert low <= metrics[section]["caption_word_accuracy"]["color_shape"] <= high
            game = metrics[section]["pointing_game"]["rgae"]
            assert game["hit_rate_interval"][0] <= game["hit_rate"] <= game["hit_rate_interval"][1]
        assert metrics["test"]["scenes"]["n_scenes"] == SCENE_SETS["test"].size


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_offline_and_reproduces_its_recorded_accuracy(name):
    """Re-measures teacher-forced color/shape accuracy on the first test scenes (not the recorded number)."""
    import deco_models
    from deco_models.recipes.shapes_mini import TEST_SEED, caption_word_accuracy

    model, processor = deco_models.load(name)
    entry = zoo.resolve(name)
    assert model.config.projector_type == entry.projector
    assert processor.num_image_tokens == model.config.num_image_tokens
    recorded = _test_metrics(name)["caption_word_accuracy"]["color_shape"]
    measured = caption_word_accuracy(model, processor, n_scenes=40, seed=TEST_SEED)["color_shape"]
    # Chance is 0.25 (color) / 0.33 (shape): 0.75 means the image is really read; 40 of 200 scenes ≈ ±0.05 noise.
    assert measured >= 0.75 and measured >= recorded - 0.08, (measured, recorded)


# The quality bars, on the test scenes. A bar a shipped model misses is a strict expected failure with its
# measured value (200 test scenes): meeting it takes retraining, never a lower bar or another scene seed.
BARS = {  # (projector, bar): minimum
    ("mlp2x_gelu", "sanity_gate"): 0.88, ("avgpool2_36", "sanity_gate"): 0.88, ("qformer2_36", "sanity_gate"): 0.88,
    ("mlp2x_gelu", "pointing"): 0.75, ("mlp2x_gelu", "above_random"): 0.40, ("mlp2x_gelu", "above_raw_last"): 0.15,
    ("avgpool2_36", "pointing"): 0.50, ("avgpool2_36", "above_random"): 0.25, ("avgpool2_36", "above_raw_last"): 0.10,
}
MISSED = {  # measured on the 200 test scenes (metrics.json "test"), with the 95% scene-bootstrap interval
    ("shapes-mini-qformer2_36", "sanity_gate"): "color/shape accuracy 0.847 [0.826, 0.869] < 0.88 (validation: 0.839); "
    "the Q-Former model needs retraining (issue 15)",
}


def _bar_value(metrics: dict, bar: str) -> float:
    game = metrics["pointing_game"]
    return {"sanity_gate": lambda: metrics["caption_word_accuracy"]["color_shape"],
            "pointing": lambda: game["rgae"]["hit_rate"],
            "above_random": lambda: game["rgae"]["hit_rate"] - game["rgae"]["random"],
            "above_raw_last": lambda: game["rgae"]["hit_rate"] - game["rawattn_last"]["hit_rate"]}[bar]()


def _bar_cases():
    for (projector, bar), minimum in BARS.items():
        name = f"shapes-mini-{projector}"
        if name not in SHIPPED:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=MISSED[name, bar])] if (name, bar) in MISSED else []
        yield pytest.param(name, bar, minimum, marks=marks, id=f"{projector}-{bar}")


@pytest.mark.parametrize(("name", "bar", "minimum"), list(_bar_cases()))
def test_quality_bars_on_the_test_scenes(name, bar, minimum):
    """Issue 15's bars on the recorded test numbers (re-measured by the slow test below): the sanity gate (>= 0.88
    teacher-forced color/shape accuracy) for every model; for the uncompressed model R-GAE's pointing game >= 0.75,
    >= random + 0.40, >= last-layer raw attention + 0.15; for avgpool >= 0.50 (and looser margins)."""
    assert _bar_value(_test_metrics(name), bar) >= minimum


def test_deco_zoo_list_prints_every_model(capsys):
    from deco_models.cli import main

    assert main(["zoo", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == SHIPPED


@pytest.mark.slow
def test_shortened_recipe_end_to_end(tmp_path):
    """Every step of the recipe (tokenizer, both pretrainings, data, align, LoRA finetune, eval, ship) at tiny sizes,
    then the shipped copy loads and generates."""
    import torch

    from deco_models.data.shapes import generate_scene
    from deco_models.recipes import shapes_mini

    results = shapes_mini.run(tmp_path / "run", quick=True, projectors=["avgpool2_36"], ship_to=tmp_path / "zoo")
    assert set(results) == {"avgpool2_36"}
    validation = results["avgpool2_36"]["validation"]
    assert validation["scenes"]["set"] == "validation" and "test" not in results["avgpool2_36"]
    assert 0.0 <= validation["caption_word_accuracy"]["color_shape"] <= 1.0
    assert 0.0 <= validation["grounding"]["acc50"] <= 1.0
    shipped = tmp_path / "zoo"
    assert (shipped / "avgpool2_36" / "adapter_model.safetensors").is_file()
    # Shipping is where a model meets the test scenes, once.
    test = json.loads((shipped / "avgpool2_36" / "metrics.json").read_text())["test"]
    assert (test["scenes"]["set"], test["scenes"]["n_scenes"]) == ("test", shapes_mini.QUICK["test_scenes"])
    shipped_tokenizer = json.loads((shipped / "base" / "llm" / "tokenizer.json").read_text())
    assert shipped_tokenizer == json.loads(shapes_mini.build_tokenizer().backend_tokenizer.to_str())
    model, processor = shapes_mini.load_trained(shipped / "base", shipped / "avgpool2_36")
    assert model.config.num_image_tokens == 36
    inputs = processor(text=processor.render_prompt("Describe the image."), images=generate_scene(0).image)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_test_pointing_games_are_reproduced(name):
    """The numbers the bars read are real: R-GAE's and last-layer raw attention's pointing game on the 200 test
    scenes, measured again."""
    import deco_models
    import rgae
    from deco_models.recipes.shapes_mini import TEST_SEED, pointing_game
    from rgae.methods import RawAttention

    recorded = _test_metrics(name)["pointing_game"]
    model, processor = deco_models.load(name)
    n = recorded["n_scenes"]
    ours = pointing_game(rgae.RGAE(model, processor), n_scenes=n, seed=TEST_SEED, progress=False)
    raw_last = pointing_game(RawAttention(model, processor), n_scenes=n, seed=TEST_SEED, progress=False, layer=-1)
    assert ours["n_words"] == recorded["rgae"]["n_words"] >= 300
    # One word flipping by a kernel difference is 1/500 of the rate.
    assert ours["hit_rate"] == pytest.approx(recorded["rgae"]["hit_rate"], abs=0.005)
    assert raw_last["hit_rate"] == pytest.approx(recorded["rawattn_last"]["hit_rate"], abs=0.005)


# ------------------------------------------------------------------------------------------------ the protocol


def _layouts(scene_set, n=None) -> set:
    from deco_models.data.shapes import layout_key

    return {layout_key(s) for s in scene_set.scenes(n)}


def test_scene_sets_have_distinct_seeds_and_the_recipes_sizes():
    from deco_models.recipes.shapes_mini import FULL, SCENE_SETS

    seeds = [s.seed for s in SCENE_SETS.values()]
    assert len(seeds) == len(set(seeds))
    assert {s.role for s in SCENE_SETS.values()} == {"train", "validation", "test"}
    assert SCENE_SETS["validation"].seed == 12345  # every choice so far was made on it
    assert SCENE_SETS["train"].size == FULL["n_scenes"]
    assert SCENE_SETS["train_vision"].size == FULL["vision_steps"] * FULL["vision_batch"]
    assert SCENE_SETS["test"].size >= FULL["test_scenes"]


def test_the_recipe_draws_its_training_scenes_from_the_training_sets():
    """The constants are the ones the training code uses, not a description beside it."""
    import inspect

    import numpy as np

    from deco_models.data import shapes
    from deco_models.recipes import shapes_mini
    from deco_models.recipes.shapes_mini import SCENE_SETS

    pixels, _ = shapes_mini._vision_batch(None, 2, SCENE_SETS["train_vision"].seed, 5)
    expected = shapes_mini.images_to_pixels(np.stack([s.image for s in SCENE_SETS["train_vision"].scenes(7)[5:]]))
    assert np.array_equal(pixels.numpy(), expected.numpy())
    first = SCENE_SETS["train_llm"].scenes(1)[0]
    assert shapes_mini.world_corpus(1, SCENE_SETS["train_llm"].seed)[0] == shapes.caption(first)
    assert inspect.signature(shapes_mini.make_datasets).parameters["seed"].default == SCENE_SETS["train"].seed
    assert "VISION_SEED + seed" in inspect.getsource(shapes_mini.pretrain_vision)
    assert "LLM_TEXT_SEED + seed" in inspect.getsource(shapes_mini.pretrain_llm)


def test_validation_and_test_scenes_share_no_layout():
    from deco_models.recipes.shapes_mini import SCENE_SETS

    validation, test = _layouts(SCENE_SETS["validation"]), _layouts(SCENE_SETS["test"])
    assert len(validation) == SCENE_SETS["validation"].size and len(test) == SCENE_SETS["test"].size
    assert not validation & test


@pytest.mark.slow
def test_no_evaluation_scene_occurs_in_any_training_set():
    """By content: the objects with their exact boxes (a layout repeated with other noise is still a leak)."""
    from deco_models.recipes.shapes_mini import EVAL_SETS, SCENE_SETS

    held_out = set().union(*(_layouts(SCENE_SETS[name]) for name in EVAL_SETS))
    for scene_set in SCENE_SETS.values():
        if scene_set.role == "train":
            assert not held_out & _layouts(scene_set), scene_set.name

"""rgae.datasets without a model: the record format and its readers, the shapes reader, the store's files, the mask
metrics against the box metrics, the statistics against scipy, and the evaluation's bookkeeping."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae import Explanation
from rgae.datasets import ExplanationStore, evaluation, read_dataset, record_from_json, record_to_json, stats, store
from rgae.datasets.readers import register_reader
from rgae.datasets.records import Box, Record
from rgae.metrics import image_energy_in_box, image_pointing_game, layout_random_pointing

DOCTEST_MODULES = ["rgae.datasets.records", "rgae.datasets.readers", "rgae.datasets.stats", "rgae.datasets.site",
                   "rgae.datasets.evaluation", "deco_models.data.shapes_dataset"]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_rgae_datasets_never_imports_deco_models():
    # Layering: the shapes reader reaches rgae through the entry point, never the other way round.
    for file in Path(__file__).resolve().parents[1].joinpath("rgae", "datasets").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "deco_models" for n in names), f"{file.name} imports {names}"


# ------------------------------------------------------------------------------------------------------- records


def test_record_format_fields_and_round_trip():
    value = {"id": 3, "image": "img/3.png", "text": "a red circle", "prompt": "Describe.", "mask": "m/3.png",
             "boxes": [{"words": ["Red", "circle."], "box": [1, 2, 30, 40], "label": 2, "kinds": {"Circle": "noun"}}],
             "split": "val"}
    r = record_from_json(value)
    assert (r.id, r.image, r.text, r.prompt, r.mask, r.extra) == ("3", "img/3.png", "a red circle", "Describe.",
                                                                  "m/3.png", {"split": "val"})
    box = r.boxes[0]
    assert box.words == ("red", "circle") and box.box == (1.0, 2.0, 30.0, 40.0) and box.label == 2
    assert box.kind("red") == "color" and box.kind("circle") == "noun"  # "kinds" overrides the lexicon
    back = record_from_json(record_to_json(r))
    assert back == r


@pytest.mark.parametrize("value,message", [
    ({"image": "a.png"}, "'id'"),
    ({"id": True, "image": "a.png"}, "'id'"),
    ({"id": 1}, "'image'"),
    ({"id": 1, "image": "a.png", "text": "  "}, "'text'"),
    ({"id": 1, "image": "a.png", "boxes": [{"words": "a", "box": [0, 0, 1]}]}, "4 numbers"),
    ({"id": 1, "image": "a.png", "boxes": [{"words": "a", "box": [5, 0, 1, 1]}]}, "x1 > x0"),
    ({"id": 1, "image": "a.png", "boxes": [{"words": 3, "box": [0, 0, 1, 1]}]}, "'words'"),
    ({"id": 1, "image": "a.png", "boxes": [{"word": "a", "box": [0, 0, 1, 1]}]}, "unknown box fields"),
    ({"id": 1, "image": "a.png", "boxes": [{"box": [0, 0, 1, 1], "label": 1.5}]}, "'label'"),
])
def test_record_format_errors_say_what_was_expected(value, message):
    with pytest.raises(ValueError, match=message):
        record_from_json(value, "d.jsonl:4")


def test_jsonl_reader_names_the_line_and_refuses_duplicate_ids(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"id": 1, "image": "a.png"}\n\n{"id": 2, "image": "b.png", "text": "x"}\n')
    assert [r.id for r in read_dataset(str(good))] == ["1", "2"]
    assert [r.id for r in read_dataset(f"jsonl:{good}")] == ["1", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "a.png"}\n{"id": 1, "image": "a.png"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON record"):
        read_dataset(str(bad))
    bad.write_text('{"id": 1, "image": "a.png"}\n{"id": 1, "image": "b.png"}\n')
    with pytest.raises(ValueError, match="duplicate record id '1'"):
        read_dataset(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        read_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown scheme 'nosuch'.*register_reader"):
        read_dataset("nosuch:1")


def test_rec_question_files_become_phrase_records(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    q = tmp_path / "refcoco.jsonl"
    lines = [
        {"question_id": 7, "image": "a.jpg", "category": "refcoco_val", "bbox": [0.1, 0.2, 0.5, 0.9],
         "text": "Please provide the bounding box coordinate of the region this sentence describes: the left red car."},
        {"question_id": 8, "image": "b.jpg", "width": 640, "height": 480, "bbox": [0, 0, 0.5, 0.5],
         "text": "?", "phrase": "man in a blue shirt"},
    ]
    q.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for spec in (str(q), f"rec:{q}"):
        a, b = read_dataset(spec, image_folder=str(tmp_path))
        assert a.id == "7" and a.text == "the left red car" and a.extra == {"category": "refcoco_val"}
        assert a.boxes[0].words == ("red", "car")  # articles and spatial words name no part of the object
        assert a.boxes[0].box == pytest.approx((20.0, 20.0, 100.0, 90.0))  # read the size from the image header
        assert b.text == "man in a blue shirt" and b.boxes[0].words == ("man", "blue", "shirt")
        assert b.boxes[0].box == pytest.approx((0.0, 0.0, 320.0, 240.0))
        assert [b.boxes[0].kind(w) for w in b.boxes[0].words] == ["noun", "color", "noun"]
    q.write_text(json.dumps({"question_id": 1, "image": "none.jpg", "bbox": [0, 0, 1, 1], "text": "x: y"}) + "\n")
    with pytest.raises(ValueError, match="refcoco.jsonl:1: needs 'width'/'height'"):
        read_dataset(str(q), image_folder=str(tmp_path))


def test_registered_and_installed_readers():
    from rgae.datasets.readers import readers

    register_reader("twice", lambda args, folder: [Record(id=f"{args}-{k}", image="x.png") for k in range(2)])
    assert [r.id for r in read_dataset("twice:a")] == ["a-0", "a-1"]
    assert "shapes" in readers()  # deco_models advertises it in the rgae.datasets entry-point group
    with pytest.raises(ValueError, match="scheme"):
        register_reader("x", lambda a, f: [])


def test_shapes_reader_scores_exactly_the_words_the_shapes_table_scores():
    # examples/shapes_table.py scores rgae.commands.demo.unique_word_boxes: the color/shape words of the caption
    # whose object is the only one with that attribute. The records' boxes must select the same (word, box) pairs.
    from deco_models.data.shapes import generate_scene
    from rgae.commands.demo import unique_word_boxes

    records = read_dataset("shapes:12345:30")
    assert [r.id for r in records[:2]] == ["000000", "000001"]
    for k, r in enumerate(records):
        scene = generate_scene((12345, k), max_objects=3)
        assert np.array_equal(r.image, scene.image) and np.array_equal(r.mask, scene.mask)
        words = r.text.split()
        expl = Explanation(method="x", target_text=r.text, output_tokens=words,
                           text_to_patch=torch.zeros(len(words), 4), patch_grid=(2, 2))
        mine = [(i, w, list(r.boxes[j].box)) for i, w in enumerate(words) for j, b in enumerate(r.boxes)
                if w in b.words]
        assert mine == [(i, w, [float(v) for v in box]) for i, w, box in unique_word_boxes(expl, scene)]
        for j, b in enumerate(r.boxes):  # mask label j + 1 is exactly the object's pixels, inside its box
            ys, xs = np.nonzero(r.mask_region(r.mask, b))
            assert b.label == j + 1 and (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == b.box
    with pytest.raises(ValueError, match="shapes:SEED:N"):
        read_dataset("shapes:1")


# ------------------------------------------------------------------------------------------- mask vs box metrics


@settings(max_examples=150, deadline=None)
@given(data=st.data(), h=st.integers(1, 20), w=st.integers(1, 20), views=st.integers(1, 2))
def test_a_mask_that_is_the_box_scores_exactly_like_the_box(data, h, w, views):
    # Views of a few patches over an h x w image, padded past its edges (a padded square, a tile): the word's map is
    # the layout's rendering over the original pixels; the mask is an integer box's rectangle.
    from rgae.layout import ImageLayout, View

    parts = []
    for k in range(views):
        x0, y0 = data.draw(st.integers(-5, w - 1)), data.draw(st.integers(-5, h - 1))
        grid = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)))
        parts.append(View(f"v{k}", grid, (x0, y0, data.draw(st.integers(x0 + 1, w + 5)),
                                          data.draw(st.integers(y0 + 1, h + 5)))))
    layout = ImageLayout((h, w), parts, [0])
    values = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0]),
                                             min_size=layout.n_patches, max_size=layout.n_patches)))
    image_map = layout.render(values).numpy()
    x0, y0 = data.draw(st.integers(0, w - 1)), data.draw(st.integers(0, h - 1))
    box = (x0, y0, data.draw(st.integers(x0 + 1, w)), data.draw(st.integers(y0 + 1, h)))
    region = np.zeros((h, w), bool)
    region[box[1]:box[3], box[0]:box[2]] = True
    pointing, random, energy = evaluation.region_scores(image_map, region, layout)
    assert pointing == float(image_pointing_game(image_map, box))
    assert random == layout_random_pointing(layout, box)
    assert energy == pytest.approx(image_energy_in_box(image_map, box), abs=1e-12)


def _tiled() -> Explanation:
    """Two views, as a tiled model sees an image: a global view and a tile over its right half; "dog"'s relevance
    sits in the tile's left patch, i.e. in columns 4..5 of the 8-wide image."""
    from rgae.layout import ImageLayout, View

    layout = ImageLayout((4, 8), (View("global", (1, 2), (0, 0, 8, 4)), View("tile", (1, 2), (4, 0, 8, 4))),
                         torch.arange(4), query_to_patch=torch.eye(4), rule="identity")
    return Explanation(method="rgae", target_text="a dog", output_tokens=["a", "dog"],
                       text_to_patch=torch.tensor([[0.0] * 4, [0.0, 0.0, 8.0, 0.0]]), layout=layout,
                       image=np.zeros((4, 8, 3), np.uint8), image_positions=torch.arange(4))


def test_tiled_maps_are_scored_on_the_original_image():
    # Not where the tile's patch index would put it on a single grid.
    e = _tiled()
    r = Record(id="t", image="x.png", boxes=(Box(("dog",), (4, 0, 6, 4)),), original_hw=(4, 8))
    (score,) = evaluation.localization_scores(e, r)
    # Of the 4 patch centers (2, 2), (6, 2) global and (5, 2), (7, 2) in the tile, one lies in the box.
    assert (score.pointing, score.energy, score.pointing_random) == (1.0, 1.0, 0.25)
    with pytest.raises(ValueError, match=r"record's image is \(4, 4\)"):
        evaluation.localization_scores(e, Record(id="t", image="x.png", boxes=r.boxes, original_hw=(4, 4)))
    with pytest.raises(ValueError, match="several views .*global, tile.*pointing,energy"):
        evaluation.check_perturbable(e)


def _explanation(t2p: torch.Tensor, words: list[str], grid=(2, 2), image_hw=(8, 8)) -> Explanation:
    return Explanation(method="rgae", target_text=" ".join(words), output_tokens=words, text_to_patch=t2p,
                       patch_grid=grid, image=np.zeros((*image_hw, 3), np.uint8))


def test_localization_scores_by_hand():
    # 2x2 grid over an 8x8 image. "red" points at the top-right cell, "circle" has all its mass top-left.
    t2p = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 0.0, -1.0]])
    e = _explanation(t2p, ["a", "red", "circle"])
    mask = np.zeros((8, 8), np.int32)
    mask[0:4, 4:8] = 1  # object 1 fills the top-right cell
    mask[6:8, 0:2] = 2
    r = Record(id="r", image="x.png", boxes=(Box(("red", "circle"), (4, 0, 8, 4), label=1),
                                             Box(("circle",), (0, 4, 4, 8), label=2)), mask=mask, original_hw=(8, 8))
    scores = evaluation.localization_scores(e, r)
    assert [(s.word, s.box_index, s.kind) for s in scores] == [("red", 0, "color"), ("circle", 0, "shape"),
                                                                ("circle", 1, "shape")]
    red, circle0, circle1 = scores
    assert (red.pointing, red.pointing_random, red.energy) == (1.0, 0.25, 0.75)
    assert (red.pointing_mask, red.pointing_mask_random, red.energy_mask) == (1.0, 0.25, 0.75)
    assert (circle0.pointing, circle0.energy) == (0.0, 0.0)
    # Object 2 covers a quarter of the bottom-left cell and not its center pixel (2, 6).
    assert (circle1.pointing, circle1.energy, circle1.pointing_mask, circle1.energy_mask) == (0.0, 0.0, 0.0, 0.0)
    # A box without a label on a record with one box uses the mask's nonzero pixels: object 2 adds a quarter of
    # the bottom-left cell's mass (1 of 4).
    one = Record(id="s", image="x.png", boxes=(Box(("red",), (4, 0, 8, 4)),), mask=mask, original_hw=(8, 8))
    assert evaluation.localization_scores(e, one)[0].energy_mask == 0.75 + 0.25 / 4


# ------------------------------------------------------------------------------------------------------- statistics


def test_exact_permutation_test_matches_scipy():
    from scipy.stats import permutation_test

    rng = np.random.default_rng(3)
    for n in (3, 7, 11):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.4
        ref = permutation_test((b, a), lambda x, y: np.mean(x - y), permutation_type="samples",
                               alternative="two-sided", n_resamples=np.inf).pvalue
        assert stats.paired_permutation_test(b - a) == pytest.approx(ref, abs=1e-12)


def test_monte_carlo_permutation_test_approaches_the_exact_one_and_groups_sum():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, size=16)
    exact = stats.paired_permutation_test(d)
    # 32 items in 16 groups of 2: the test flips each group's sum, so it equals the exact test on the sums.
    halves = np.repeat(d / 2, 2)
    assert stats.paired_permutation_test(halves, groups=np.repeat(np.arange(16), 2)) == pytest.approx(exact)
    many = np.concatenate([d, d])  # 32 groups: Monte Carlo
    mc = stats.paired_permutation_test(many, n_resamples=20000, seed=1)
    ref = stats.paired_permutation_test(many, n_resamples=200000, seed=2)
    assert abs(mc - ref) < 0.01
    assert stats.paired_permutation_test(np.zeros(5)) == 1.0


def test_bootstrap_intervals():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, size=300)
    mean, lo, hi = stats.mean_ci(x, n_resamples=4000)
    ref = bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)
    # One item per group is the plain bootstrap; a constant has a zero-width interval.
    assert np.array_equal(stats.bootstrap_means(x[:20], groups=np.arange(20), n_resamples=300),
                          stats.bootstrap_means(x[:20], n_resamples=300))
    assert stats.mean_ci([0.5] * 6, groups=[0, 0, 1, 1, 2, 2]) == (0.5, 0.5, 0.5)
    # The clustered mean is the item mean (records of different sizes weigh by their items).
    samples = stats.bootstrap_means([1.0, 1.0, 1.0, 0.0], groups=[0, 0, 0, 1], n_resamples=2000)
    assert set(np.round(np.unique(samples), 6)) <= {0.0, 0.75, 1.0}
    assert samples.mean() == pytest.approx(0.625, abs=0.03)  # E over draws, not the item mean 0.75 exactly


def test_compare_pairs_words_and_differences():
    def ev(name, hits):
        e = evaluation.StoreEvaluation(name=name, path=name, manifest={}, record_ids=["r0", "r1"], failures={})
        for k, h in enumerate(hits):
            e.scores.append(evaluation.WordScore(record=f"r{k // 2}", word_index=k % 2, word=f"w{k % 2}",
                                                 box_index=0, kind="color", pointing=h, pointing_random=0.1,
                                                 energy=h / 2))
        return e

    a, b = ev("a", [0, 0, 1, 0]), ev("b", [1, 1, 1, 1])
    res = evaluation.compare(a, b)
    p = res["metrics"]["pointing"]
    assert res["pairs"] == 4 and (p["a"], p["b"], p["difference"]) == (0.25, 1.0, 0.75)
    assert p["p_value"] == 0.5  # two records, both differences positive: 2 of 4 sign patterns are as extreme
    assert res["metrics"]["pointing_random"]["difference"] == 0.0
    assert res["by_kind"]["color"]["pointing"]["n"] == 4


# ------------------------------------------------------------------------------------------------------------ store


def _synthetic(k: int) -> Explanation:
    g = torch.Generator().manual_seed(k)
    return Explanation(method="rgae", target_text="a red circle", output_tokens=["a", "red", "circle"],
                       text_to_patch=torch.rand(3, 4, generator=g), patch_grid=(2, 2),
                       text_to_query=torch.rand(3, 4, generator=g), query_to_patch=torch.eye(4), query_grid=(2, 2),
                       token_ids=torch.tensor([5, 6, 7]), token_probs=torch.rand(3, generator=g),
                       image=np.full((8, 8, 3), k, np.uint8), prompt="p", options={"k": k})


def assert_same_explanation(a: Explanation, b: Explanation) -> None:
    """Every field equal: tensors in value and dtype, arrays, the rest."""
    for f in a.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f
        elif f == "layout" and x is not None:
            assert x.to_dict() == y.to_dict(), f
            for part in ("positions", "placeholder", "query_to_patch"):
                px, py = getattr(x, part), getattr(y, part)
                assert (px is None and py is None) or torch.equal(px, py), f"layout.{part}"
        else:
            assert x == y, f


def test_store_round_trip_equals_explanation_save_and_load(tmp_path):
    store.write_manifest(tmp_path / "s", {"model": "m", "method": "rgae", "options": {}, "data": "d"})
    writer = store.ShardWriter(tmp_path / "s", rank=1)
    mask = np.zeros((8, 8), np.int32)
    mask[:2, :2] = 3
    for k in range(3):
        rec = Record(id=f"id{k}", image="x.png", text="a red circle", boxes=(Box(("red",), (0, 0, 4, 4), 3),),
                     mask=mask, original_hw=(8, 8))
        writer.add(2 - k, rec, _synthetic(k), seconds=0.5)
    writer.add_failure(3, Record(id="bad", image="y.png"), "ValueError: unreadable")
    shard = writer.flush()
    s = ExplanationStore(tmp_path / "s")
    assert len(s) == 3 and s.ids() == ["id2", "id1", "id0"] and list(s) == s.ids()  # dataset order
    assert s.failures == {"bad": "ValueError: unreadable"} and "bad" not in s
    for k in range(3):
        _synthetic(k).save(tmp_path / f"e{k}")
        assert_same_explanation(s[f"id{k}"], Explanation.load(tmp_path / f"e{k}"))
    r = s.record("id1")
    assert r.boxes[0].label == 3 and r.original_hw == (8, 8) and np.array_equal(r.mask, mask)
    assert s.seconds("id1") == 0.5
    # query_to_patch (the same identity in every record) and the mask are stored once.
    from safetensors import safe_open

    with safe_open(str(shard.with_suffix(".safetensors")), framework="pt") as f:
        stored = [f.get_tensor(key) for key in f.keys()]
    # (Explanation.to_parts stores the identity sparsely: the flat indices of its diagonal and its ones.)
    diagonal = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    assert sum(t.dtype == torch.int32 and torch.equal(t, diagonal) for t in stored) == 1
    assert sum(t.shape == (8, 8) for t in stored) == 1 and s.record("id0").mask.dtype == np.uint8
    with pytest.raises(KeyError, match="it failed: ValueError"):
        s["bad"]


def test_store_keeps_a_tiled_explanation_s_layout(tmp_path):
    store.write_manifest(tmp_path / "s", {"method": "rgae"})
    writer = store.ShardWriter(tmp_path / "s")
    writer.add(0, Record(id="t", image="x.png", original_hw=(4, 8)), _tiled(), 0.1)
    writer.flush()
    back = ExplanationStore(tmp_path / "s")["t"]
    _tiled().save(tmp_path / "e")
    assert_same_explanation(back, Explanation.load(tmp_path / "e"))
    assert back.layout.to_dict() == _tiled().layout.to_dict()
    assert torch.equal(back.image_map(word="dog"), _tiled().image_map(word="dog"))


def test_store_files_are_atomic_and_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        store.write_manifest(tmp_path / "s", {"method": "rgae"})
        writer = store.ShardWriter(tmp_path / "s")
        writer.add(0, Record(id="a", image="x.png", original_hw=(8, 8)), _synthetic(0), 0.1)
        shard = writer.flush()
    finally:
        os.umask(old)
    for f in (tmp_path / "s" / "store.json", shard, shard.with_suffix(".safetensors")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert not list((tmp_path / "s" / "shards").glob(".*"))  # no temporary files left


def test_killed_writer_leftovers_are_cleaned_and_duplicates_refused(tmp_path):
    store.write_manifest(tmp_path / "s", {"method": "rgae"})
    shards = tmp_path / "s" / "shards"
    writer = store.ShardWriter(tmp_path / "s")
    writer.add(0, Record(id="a", image="x.png", original_hw=(8, 8)), _synthetic(0), 0.1)
    done = writer.flush()
    (shards / "r000-orphan.safetensors").write_bytes(b"half")  # killed before its index was written
    (shards / ".r000-x.json.1.ab.tmp").write_bytes(b"{")
    assert store.finished_ids(tmp_path / "s") == {"a"}
    removed = store.clean_shards(tmp_path / "s")
    assert sorted(p.name for p in removed) == [".r000-x.json.1.ab.tmp", "r000-orphan.safetensors"]
    assert sorted(p.name for p in shards.iterdir()) == sorted([done.name, done.with_suffix(".safetensors").name])
    twin = store.ShardWriter(tmp_path / "s", rank=5)
    twin.add(0, Record(id="a", image="x.png", original_hw=(8, 8)), _synthetic(0), 0.1)
    twin.flush()
    with pytest.raises(ValueError, match="record 'a' is in two shards"):
        ExplanationStore(tmp_path / "s")


def test_manifest_refuses_other_settings_and_non_stores(tmp_path):
    m = {"model": "m", "model_fingerprint": "f1", "method": "rgae", "options": {"through_vision": False},
         "data": "shapes:1:4"}
    store.write_manifest(tmp_path / "s", m)
    assert store.check_manifest(tmp_path / "s", {**m, "model": "renamed", "created": "later"})["model"] == "m"
    with pytest.raises(ValueError, match=r"options = \{\"through_vision\": false\}.*\{\"through_vision\": true\}"):
        store.check_manifest(tmp_path / "s", {**m, "options": {"through_vision": True}})
    with pytest.raises(ValueError, match="method"):
        store.check_manifest(tmp_path / "s", {**m, "method": "rawattn"})
    with pytest.raises(ValueError, match="another model .*'m'.*weights differ"):
        store.check_manifest(tmp_path / "s", {**m, "model_fingerprint": "f2"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not an explanation store"):
        store.check_manifest(tmp_path / "other", m)
    with pytest.raises(ValueError, match="not an explanation store"):
        ExplanationStore(tmp_path / "nothing")

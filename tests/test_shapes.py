"""The shapes world: determinism, exact ground truth, well-formed LLaVA tasks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deco_models.data import shapes

SEEDS = [(0, i) for i in range(60)]


def _is_background(pixels: np.ndarray) -> np.ndarray:
    """Background is light and nearly gray; every object color has a channel far below it."""
    return pixels.min(axis=-1) >= 190


def test_same_seed_same_scene_different_seed_different_scene():
    a, b, c = shapes.generate_scene((3, 1)), shapes.generate_scene((3, 1)), shapes.generate_scene((3, 2))
    assert np.array_equal(a.image, b.image) and a.to_json() == b.to_json()
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_are_tight_and_match_drawn_pixels(seed):
    scene = shapes.generate_scene(seed, max_objects=4)
    assert 1 <= len(scene.objects) <= 4
    inside_any = np.zeros(scene.mask.shape, bool)
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        crop = scene.image[y0:y1, x0:x1]
        own = scene.mask[y0:y1, x0:x1] == k + 1
        # The object's color is inside its box, on every edge of it (tight box), and nowhere else.
        rgb = np.array(shapes.COLOR_RGB[obj.color])
        near_color = np.abs(crop.astype(int) - rgb).max(axis=-1) <= 20
        assert (near_color == own).all()
        assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any()
        assert obj.box_norm == [round(v / shapes.IMAGE_SIZE, 4) for v in obj.box]
        lo, hi = shapes.SIZE_RANGES[obj.size]
        assert lo - 1 <= max(x1 - x0, y1 - y0) <= hi
        inside_any[y0:y1, x0:x1] = True
    # Outside every box: only background.
    assert _is_background(scene.image[~inside_any]).all()
    assert (scene.mask[~inside_any] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_objects_do_not_overlap_and_are_sorted_left_to_right(seed):
    scene = shapes.generate_scene(seed, max_objects=4)
    for i, a in enumerate(scene.objects):
        assert a.rank == i
        for b in scene.objects[i + 1 :]:
            ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
            iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
            assert ix <= 0 or iy <= 0, "boxes overlap"
            assert a.center[0] < b.center[0]
    left_of = {(r["subject"], r["object"]) for r in scene.relations if r["relation"] == "left of"}
    n = len(scene.objects)
    assert left_of == {(i, j) for i in range(n) for j in range(n) if i < j}


def test_caption_lists_objects_left_to_right():
    for seed in SEEDS[:20]:
        scene = shapes.generate_scene(seed)
        parts = shapes.caption(scene).split(" left of ")
        assert parts == [f"a {o.size} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.center[0])]
    scene = shapes.generate_scene((0, 0), n_objects=1)
    assert shapes.caption(scene) == f"a {scene.objects[0].name}"


def test_patch_labels_hand_checked_on_a_square():
    scene = shapes.generate_scene((0, 5), n_objects=1)
    labels = shapes.patch_labels(scene, min_fraction=1.0)
    obj = scene.objects[0]
    full = {(r, c) for r in range(shapes.GRID) for c in range(shapes.GRID)
            if (scene.mask[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] == 1).all()}
    on = {divmod(p, shapes.GRID) for p in np.nonzero(labels[:, shapes.PATCH_LABELS.index(obj.color)])[0]}
    assert on == full
    assert labels[:, shapes.PATCH_LABELS.index(obj.shape)].sum() == len(full)
    assert labels.sum() == 2 * len(full)


def _answer_is_true(scene, sample) -> bool:
    q = sample["conversations"][0]["value"].removeprefix("<image>\n")
    a = sample["conversations"][1]["value"]
    objs = scene.objects
    task = sample["task"]
    if task == "caption":
        return a == shapes.caption(scene)
    if task == "pope":
        color, shape = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q).groups()
        present = any(o.color == color and o.shape == shape for o in objs)
        return a == ("yes" if present else "no")
    if task == "counting":
        m = re.fullmatch(r"How many (\w+ )?objects are there\?", q)
        color = (m.group(1) or "").strip()
        count = sum(1 for o in objs if not color or o.color == color)
        return a == shapes.NUMBER_WORDS[count]
    obj = objs[sample["object"]]
    if task == "grounding":
        return a == shapes.box_text(obj.box_norm) and q == f"Where is the {obj.color} {obj.shape}?"
    if task == "vqa":
        return a in (obj.color, obj.shape, obj.size) and (obj.shape in q or obj.color in q)
    return False


def test_tasks_are_well_formed_and_answers_are_true():
    kinds = set()
    for seed in SEEDS:
        scene = shapes.generate_scene(seed, max_objects=4)
        samples = shapes.scene_tasks(scene, "s", "img.png")
        assert {s["task"] for s in samples} >= {"caption", "pope", "counting"}
        for s in samples:
            assert set(s) >= {"id", "image", "conversations", "task"}
            human, gpt = s["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert _answer_is_true(scene, s), s
            kinds.add(s.get("pope"))
        pope = [s for s in samples if s["task"] == "pope"]
        assert sum(s["conversations"][1]["value"] == "yes" for s in pope) == len(pope) / 2
    assert kinds >= set(shapes.POPE_KINDS)


def test_adversarial_negative_shares_an_attribute():
    scene = shapes.generate_scene((1, 1), n_objects=2)
    rng = np.random.default_rng(0)
    present = {(o.color, o.shape) for o in scene.objects}
    for _ in range(20):
        c, s = shapes.pope_negative(scene, "adversarial", rng)
        assert (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
    with pytest.raises(ValueError, match="POPE kind"):
        shapes.pope_negative(scene, "nope", rng)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="max_objects"):
        shapes.generate_scene(0, max_objects=5)
    with pytest.raises(ValueError, match="tasks"):
        shapes.scene_tasks(shapes.generate_scene(0), "s", "i.png", tasks=("poetry",))


def test_write_dataset_round_trips(tmp_path):
    import cv2

    out = shapes.write_dataset(tmp_path / "ds", 12, seed=4, progress=False)
    records = json.loads((out / "scenes.json").read_text())
    convs = json.loads((out / "conversations.json").read_text())
    assert len(records) == 12 and {c["image"] for c in convs} == {r["image"] for r in records}
    for i in (0, 11):
        img = cv2.cvtColor(cv2.imread(str(out / records[i]["image"])), cv2.COLOR_BGR2RGB)
        again = shapes.generate_scene((4, i))
        assert np.array_equal(img, again.image)
        assert records[i]["objects"] == again.to_json()["objects"]


@pytest.mark.parametrize("name", ["deco_models.data.shapes", "deco_models.recipes.shapes_mini", "deco_models.zoo"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_tokenizer_covers_every_word_of_the_world_and_the_templates():
    from deco_models.conversation import render_conversation
    from deco_models.recipes.shapes_mini import build_tokenizer

    tok = build_tokenizer()
    for seed in SEEDS[:10]:
        scene = shapes.generate_scene(seed, max_objects=4)
        for sample in shapes.scene_tasks(scene, "s", "i.png"):
            text, _ = render_conversation(sample["conversations"], "vicuna_v1")
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids, text
    assert tok.convert_ids_to_tokens(tok("<image>")["input_ids"]) == ["<s>", "<image>"]


def test_multi_turn_datasets_keep_every_answer_true_and_the_image_once(tmp_path):
    from deco_models.recipes.shapes_mini import finetune_file, make_datasets

    data = make_datasets(tmp_path / "d", 40, seed=3, turns=3, caption_first=1.0)
    make_datasets(data, 40, seed=3, turns=3, caption_first=0.5)
    make_datasets(data, 40, seed=3)  # single-turn file beside them, from the same scenes
    singles = json.loads((data / "conversations.json").read_text())
    true_pairs = {(r["image"], r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"])
                  for r in singles}
    captions = {r["image"]: r["conversations"][1]["value"] for r in singles if r["task"] == "caption"}
    first = {}
    for cf in (1.0, 0.5):
        records = json.loads((data / finetune_file(3, cf)).read_text())
        assert sorted(r["image"] for r in records) == sorted(captions)  # one conversation per scene
        first[cf] = 0
        for r in records:
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * 3
            assert turns[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in turns) == 1
            pairs = [(r["image"], turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"])
                     for i in (0, 2, 4)]
            # POPE's random and popular probes can coincide, so a question may come twice; every pair must be true.
            assert set(pairs) <= true_pairs
            assert captions[r["image"]] in [p[2] for p in pairs]
            assert (r["tasks"][0] == "caption") == (turns[1]["value"] == captions[r["image"]])
            first[cf] += turns[0]["value"] == "<image>\nDescribe the image."
    assert first[1.0] == 40 and 10 < first[0.5] < 40  # 0.5 + 0.5 / 3 expected: ~27
    single = json.loads((data / "finetune.json").read_text())
    assert all(len(r["conversations"]) == 2 for r in single)
    assert sum(r["task"] == "caption" for r in single) == 40  # every caption, at 75% of the records
    with pytest.raises(ValueError, match="turns"):
        make_datasets(tmp_path / "e", 4, turns=0)


def test_multi_turn_training_sample_supervises_exactly_the_answers(tmp_path):
    from deco_models.data.llava import LlavaConversationDataset
    from deco_models.processing import DecoProcessor
    from deco_models.recipes.shapes_mini import build_tokenizer, finetune_file, image_processor, make_datasets

    data = make_datasets(tmp_path / "d", 6, seed=5, turns=3, caption_first=1.0)
    tok = build_tokenizer()
    processor = DecoProcessor(image_processor(), tok, num_image_tokens=144, image_aspect="pad",
                              chat_template="vicuna_v1")
    ds = LlavaConversationDataset(str(data / finetune_file(3, 1.0)), str(data), processor, template="vicuna_v1",
                                  check_images="none")
    record = json.loads((data / finetune_file(3, 1.0)).read_text())[0]
    item = ds[0]
    supervised = item["labels"][item["labels"] != -100]
    answers = [t["value"] for t in record["conversations"][1::2]]
    expected = tok(" </s> ".join(answers) + " </s>", add_special_tokens=False)["input_ids"]
    assert supervised.tolist() == expected
    assert int((item["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 144


def test_stage_two_reads_the_file_written_for_its_settings(tmp_path):
    from deco_models.recipes.shapes_mini import finetune_file, stage_configs

    _, finetune = stage_configs(tmp_path / "base", tmp_path / "data", "avgpool2_36", tmp_path / "run", 1, 1,
                                turns=3, caption_first=0.5, device="cpu")
    assert finetune["data"]["data_path"] == str(tmp_path / "data" / finetune_file(3, 0.5))
    _, single = stage_configs(tmp_path / "base", tmp_path / "data", "avgpool2_36", tmp_path / "run", 1, 1)
    assert single["data"]["data_path"].endswith("finetune.json")



def _world_sentences() -> list[str]:
    """Every kind of text the world and the templates produce, as the model would write it."""
    from deco_models.conversation import TEMPLATES

    texts = [*shapes.world_texts(), *(t.system for t in TEMPLATES.values() if t.system)]
    for seed in SEEDS[:20]:
        scene = shapes.generate_scene(seed, max_objects=4)
        for sample in shapes.scene_tasks(scene, "s", "i.png"):
            question, answer = (t["value"].replace("<image>\n", "") for t in sample["conversations"])
            texts += [question, answer, f"USER: {question} ASSISTANT: {answer}"]
    return texts


def test_tokenizer_decodes_every_text_of_the_world_to_itself():
    """Issue 15: boxes decoded as "[ 0. 26, 0. 55 ]" (WordPiece's cleanup only knows " ." and " ,")."""
    from deco_models.recipes.shapes_mini import build_tokenizer

    tok = build_tokenizer()
    box = "[0.26, 0.55, 0.40, 0.71]"
    assert tok.convert_ids_to_tokens(tok(box)["input_ids"])[:5] == ["<s>", "[", "0", ".", "26"]
    assert tok.decode(tok(box)["input_ids"], skip_special_tokens=True) == box
    for text in _world_sentences():
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@given(st.lists(st.integers(0, 100), min_size=4, max_size=4))
@settings(max_examples=60, deadline=None)
def test_every_box_round_trips_through_the_tokenizer_and_the_parser(values):
    from deco_models.eval import parse_box
    from deco_models.eval.rec import _BOX
    from deco_models.recipes.shapes_mini import build_tokenizer

    if "tok" not in _TOKENIZER:
        _TOKENIZER["tok"] = build_tokenizer()
    tok = _TOKENIZER["tok"]
    text = "The red circle is in " + shapes.box_text([v / 100 for v in values]) + "."
    decoded = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    assert decoded == text
    # The strict box pattern reads it: no repair of split decimals is needed any more.
    assert _BOX.search(decoded) is not None and parse_box(decoded) == tuple(v / 100 for v in values)


_TOKENIZER: dict = {}

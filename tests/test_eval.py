"""Scorers against hand-computed cases (official VQA normalization, leave-one-out accuracy, POPE confusion matrix,
REC IoU and padded/original frames), then generation, the ``deco eval`` CLI and the lmms-eval plugin on a tiny model."""

from __future__ import annotations

import importlib
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deco_models.eval import (
    box_iou,
    gqa_accuracy,
    normalize_vqa_answer,
    original_to_padded,
    padded_to_original,
    parse_box,
    parse_pope_answer,
    pope_metrics,
    rec_accuracy,
    score_predictions,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words -> digits (manualMap)
        ("none", "0"),  # the official table maps "none" to "0" too
        ("a dog.", "dog"),  # article removed, final period stripped
        ("The Dog", "dog"),
        ("yes,", "yes"),  # attached comma -> space, then whitespace collapsed
        ("it's", "it's"),  # apostrophes are not punctuation; "it's" is not in the contractions map
        ("dont", "don't"),  # contractions map restores the apostrophe
        ("isnt", "isn't"),
        ("10,000", "10000"),  # digit,digit: the comma is deleted, never turned into a space
        ("10,000 dogs!", "10000 dogs"),  # ... and then every punctuation mark is deleted
        ("$5", "$5"),  # "$" is not in the punctuation list
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("3.", "3"),
        ("hello-world", "hello world"),  # attached mark -> space
        ("hello - world", "hello world"),  # detached mark (" -" present) -> deleted
        ("What?", "what"),
        ("  left\tside\n", "left side"),
        ("(a) dog", "dog"),
        ("The Man's hat", "man's hat"),
    ],
)
def test_official_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_by_hand(matches, expected):
    # With k matches among 10: the k subsets without a matching answer hold k-1 matches, the 10-k others hold k.
    # k = 3: (3 * min(2/3, 1) + 7 * min(3/3, 1)) / 10 = (2 + 7) / 10 = 0.9.
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_both_sides():
    answers = ["Dog", "a dog", "the dog.", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    assert vqa_accuracy("DOG", answers) == pytest.approx(0.9)
    assert vqa_accuracy("cats", answers) == 0.0
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("dog", "dog")


def _official_loop(prediction, answers):
    """vqaEval.py's loop, written as it is there: for each human answer, the others; count equal answers."""
    pred = normalize_vqa_answer(prediction)
    gts = [(i, normalize_vqa_answer(a)) for i, a in enumerate(answers)]
    accs = []
    for gt in gts:
        others = [item for item in gts if item != gt]
        accs.append(min(1.0, len([item for item in others if item[1] == pred]) / 3))
    return sum(accs) / len(accs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["2", "two", "yes", "Yes.", "no", "a cat", "cat"]), min_size=10, max_size=10),
    st.sampled_from(["2", "yes", "cat", "dog"]),
)
def test_vqa_accuracy_matches_official_loop(answers, prediction):
    assert vqa_accuracy(prediction, answers) == pytest.approx(_official_loop(prediction, answers))


def test_gqa_exact_match_after_llava_normalization():
    assert gqa_accuracy("Left.", "left") == 1.0
    assert gqa_accuracy(" Yes ", "yes") == 1.0
    assert gqa_accuracy("the left", "left") == 0.0  # no article removal in GQA
    assert gqa_accuracy("2", "two") == 0.0  # no number mapping either


# ---------------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------------


def test_pope_parser_follows_llava_eval_pope():
    assert parse_pope_answer("Yes, there is a dog.") == "yes"
    assert parse_pope_answer("No") == "no"
    assert parse_pope_answer("No, there is not.") == "no"
    assert parse_pope_answer("There is no dog in the image.") == "no"
    assert parse_pope_answer("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert parse_pope_answer("no,") == "no"  # commas are removed before splitting
    assert parse_pope_answer("NO") == "yes"  # case-sensitive, as in LLaVA's script
    assert parse_pope_answer("Nope") == "yes"
    assert parse_pope_answer("") == "yes"


def test_pope_metrics_hand_computed_confusion_matrix():
    labels = ["yes"] * 4 + ["no"] * 6
    predictions = ["Yes", "Yes, it is.", "No", "There is no cat.", "Yes", "No", "not at all", "No.", "NO", "Nope"]
    # Parsed: Y Y N N | Y N N N Y Y  ->  TP 2, FN 2, FP 3, TN 3.
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 2, 3, 3)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.4)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert m["yes_ratio"] == pytest.approx(0.5)
    # Bools are accepted for both sides.
    assert pope_metrics([True, False], [True, True])["recall"] == 0.5


def test_pope_zero_division_convention_and_errors():
    m = pope_metrics(["No", "No"], ["yes", "no"])  # nothing predicted "yes"
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    m = pope_metrics(["Yes"], ["no"])  # no positive label
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="labels"):
        pope_metrics(["Yes"], ["maybe"])
    with pytest.raises(ValueError, match="predictions for"):
        pope_metrics(["Yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one"):
        pope_metrics([], [])


# ---------------------------------------------------------------------------------------------------------------------
# REC
# ---------------------------------------------------------------------------------------------------------------------


def test_box_iou_boundary_cases():
    unit = (0.0, 0.0, 1.0, 1.0)
    assert box_iou(unit, unit) == 1.0
    assert box_iou(unit, (2, 2, 3, 3)) == 0.0  # disjoint
    assert box_iou(unit, (1, 0, 2, 1)) == 0.0  # touching edges share no area
    assert box_iou(unit, (0.5, 0, 1.5, 1)) == pytest.approx(1 / 3)
    assert box_iou(unit, (0, 0, 0.5, 1)) == 0.5  # contained half
    assert box_iou((0.5, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)) == 0.0  # zero-area union
    assert box_iou(unit, (1, 1, 0, 0)) == 0.0  # inverted box has no area
    with pytest.raises(ValueError, match="4 numbers"):
        box_iou(unit, (0, 0, 1))
    with pytest.raises(ValueError, match="non-finite"):
        box_iou(unit, (0, 0, float("nan"), 1))


def test_rec_accuracy_threshold_is_inclusive_and_misses_count():
    gt = [(0.0, 0.0, 1.0, 1.0)] * 4
    preds = [(0, 0, 0.5, 1), (0, 0, 0.49, 1), "the box is [0, 0, 1, 1]", "I cannot tell"]
    assert rec_accuracy(preds, gt) == 0.5  # IoU 0.5 counts, 0.49 does not, the unparseable answer is a miss
    assert rec_accuracy(preds, gt, iou=0.4) == 0.75
    assert rec_accuracy([None], [(0, 0, 1, 1)]) == 0.0
    with pytest.raises(ValueError, match="predicted boxes"):
        rec_accuracy([(0, 0, 1, 1)], gt)


def test_parse_box():
    assert parse_box("[0.12, 0.3, 0.5, 0.77]") == (0.12, 0.3, 0.5, 0.77)
    assert parse_box("It is at [ .1,0.2 , 0.3,0.4 ] in the image.") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("[1e-1, 0, 1, 1] and [0, 0, 0.5, 0.5]") == (0.1, 0.0, 1.0, 1.0)  # the first box
    assert parse_box("[0.1, 0.2, 0.3]") is None
    assert parse_box("no box") is None


@pytest.mark.parametrize(
    "width, height, original, padded",
    [
        (200, 100, (0, 0, 1, 1), (0, 0.25, 1, 0.75)),  # landscape: padding above and below
        (100, 200, (0, 0, 1, 1), (0.25, 0, 0.75, 1)),  # portrait: padding left and right
        (100, 200, (0.5, 0.5, 1, 1), (0.5, 0.5, 0.75, 1)),
        (101, 50, (0, 0, 1, 1), (0, 25 / 101, 1, 75 / 101)),  # odd difference: offset (101 - 50) // 2 = 25
        (64, 64, (0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)),  # square: nothing to do
    ],
)
def test_padded_original_conversion_by_hand(width, height, original, padded):
    assert original_to_padded(original, width, height) == pytest.approx(padded)
    assert padded_to_original(padded, width, height) == pytest.approx(original)


def test_padded_to_original_clips_into_the_image():
    # A predicted box reaching into the top padding band of a 200x100 image.
    assert padded_to_original((0, 0, 0.5, 0.5), 200, 100) == pytest.approx((0, 0, 0.5, 0.5))
    assert padded_to_original((0, 0, 0.5, 0.5), 200, 100, clip=False) == pytest.approx((0, -0.5, 0.5, 0.5))


@pytest.mark.parametrize("width, height", [(40, 24), (24, 40), (37, 20)])
@pytest.mark.parametrize("target_hw", [None, (16, 32), (32, 16)])
def test_frame_conversion_matches_the_padding_pixels(width, height, target_hw):
    """Paint a rectangle, pad the image as training does (deco_models.data's expand2square for square inputs,
    deco_models.processing's pad_to_aspect for rectangular ones), find the rectangle again in the canvas."""
    from PIL import Image

    from deco_models.data.llava import expand_to_square
    from deco_models.processing import pad_to_aspect

    x1, y1, x2, y2 = 5, 3, 17, 19
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[y1:y2, x1:x2] = 255
    if target_hw is None:
        canvas = np.asarray(expand_to_square(Image.fromarray(rgb), (0, 0, 0)))
        assert canvas.shape[:2] == (max(width, height),) * 2
    else:
        canvas, _ = pad_to_aspect(rgb, target_hw, (0, 0, 0))
    ch, cw = canvas.shape[:2]
    ys, xs = np.nonzero(canvas[..., 0])
    found = (xs.min() / cw, ys.min() / ch, (xs.max() + 1) / cw, (ys.max() + 1) / ch)
    box = (x1 / width, y1 / height, x2 / width, y2 / height)
    assert original_to_padded(box, width, height, target_hw=target_hw) == pytest.approx(found)
    assert padded_to_original(found, width, height, target_hw=target_hw) == pytest.approx(box)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 2000),
    st.integers(1, 2000),
    st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_padded_original_round_trip(width, height, coords):
    box = (min(coords[0], coords[2]), min(coords[1], coords[3]), max(coords[0], coords[2]), max(coords[1], coords[3]))
    padded = original_to_padded(box, width, height)
    assert all(-1e-12 <= v <= 1 + 1e-12 for v in padded)
    assert padded_to_original(padded, width, height) == pytest.approx(box, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Whole-task scoring
# ---------------------------------------------------------------------------------------------------------------------


def test_score_predictions_per_task():
    vqa_q = [
        {"question_id": 1, "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 2, "answers": ["x"] * 10},
    ]
    result = score_predictions("vqav2", vqa_q, {1: "Two", 2: {"text": "y"}})
    assert result["metrics"]["accuracy"] == pytest.approx(0.45)
    result = score_predictions(
        "gqa", [{"question_id": "a", "answer": "left"}, {"question_id": "b", "answer": "no"}], {"a": "Left."}
    )
    assert (result["metrics"]["accuracy"], result["n_scored"], result["n_missing"]) == (1.0, 1, 1)
    pope_q = [
        {"question_id": 1, "label": "yes", "category": "random"},
        {"question_id": 2, "label": "no", "category": "adversarial"},
    ]
    result = score_predictions("pope", pope_q, {1: "Yes", 2: "Yes"})
    assert result["metrics"]["accuracy"] == 0.5
    assert result["per_category"]["adversarial"]["accuracy"] == 0.0
    # RefCOCO: the model answers in the padded frame of a 200x100 image; the ground truth is in the original frame.
    ref_q = [{"question_id": 1, "bbox": [0, 0, 1, 0.2], "width": 200, "height": 100}]
    assert score_predictions("refcoco", ref_q, {1: "[0, 0.25, 1, 0.35]"})["metrics"]["acc@0.5"] == 1.0
    assert (
        score_predictions("refcoco", ref_q, {1: "[0, 0.25, 1, 0.35]"}, box_frame="original")["metrics"]["acc@0.5"]
        == 0.0
    )
    with pytest.raises(ValueError, match="task must be one of"):
        score_predictions("mme", ref_q, {1: "x"})
    with pytest.raises(ValueError, match="no ground-truth field 'label'"):
        score_predictions("pope", ref_q, {1: "x"})


# ---------------------------------------------------------------------------------------------------------------------
# Generation, CLI, lmms-eval plugin (tiny real model)
# ---------------------------------------------------------------------------------------------------------------------

QUESTIONS = [
    {"question_id": 0, "image": "wide.png", "text": "what color is the object ?", "label": "yes"},
    {"question_id": 1, "image": "tall.png", "text": "is there a circle ?", "label": "no"},
    {"question_id": 2, "image": "square.png", "text": "what shape ?", "label": "yes"},
]


# Solid colours: a random tiny vision tower sees random-noise images as nearly alike, but not black vs white vs red.
IMAGES = {
    "wide.png": np.zeros((24, 40, 3), np.uint8),
    "tall.png": np.full((40, 24, 3), 255, np.uint8),
    "square.png": np.concatenate([np.full((30, 30, 1), 255, np.uint8), np.zeros((30, 30, 2), np.uint8)], axis=-1),
}


@pytest.fixture(scope="module")
def tiny():
    from deco_models.eval import generate_batch
    from tests.tiny import tiny_deco_model, tiny_processor

    # A seed whose greedy answers depend on the image, so batching mistakes (padding, image order) would show.
    for seed in range(5):
        model = tiny_deco_model("mlp2x_gelu", seed=seed)
        processor = tiny_processor(model)
        prompts = [processor.render_prompt(q["text"]) for q in QUESTIONS]
        if len(set(generate_batch(model, processor, prompts, list(IMAGES.values()), max_new_tokens=6))) > 1:
            return model, processor
    pytest.fail("no tiny model among seeds 0-4 answers differently for different images")


@pytest.fixture
def question_file(tmp_path):
    from PIL import Image

    for name, rgb in IMAGES.items():
        Image.fromarray(rgb).save(tmp_path / name)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_generate_answers_batched_equals_one_by_one(tiny, question_file, tmp_path):
    from deco_models.eval import generate_answers, load_questions

    model, processor = tiny
    questions = load_questions(question_file)
    answers_path = tmp_path / "answers.jsonl"
    batched = generate_answers(
        model, processor, questions, tmp_path, batch_size=2, max_new_tokens=6, predictions_path=answers_path
    )
    single = [generate_answers(model, processor, [q], tmp_path, batch_size=1, max_new_tokens=6)[0] for q in questions]
    assert [a["question_id"] for a in batched] == [0, 1, 2]
    assert [a["text"] for a in batched] == [a["text"] for a in single]
    assert len({a["text"] for a in batched}) > 1
    assert batched[0]["prompt"].endswith("USER: <image>\nwhat color is the object ? ASSISTANT:")
    on_disk = [json.loads(line) for line in answers_path.read_text().splitlines()]
    assert on_disk == batched
    assert processor.tokenizer.padding_side == "right"  # restored after left-padded generation


def test_generate_answers_resumes_and_reports_missing_images(tiny, question_file, tmp_path, caplog):
    from deco_models.eval import MissingImageError, generate_answers, load_questions

    model, processor = tiny
    questions = load_questions(question_file) + [{"question_id": 3, "image": "gone.png", "text": "what ?"}]
    answers_path = tmp_path / "answers.jsonl"
    # Two answers from an "earlier run", the second one cut off mid-line by a kill.
    answers_path.write_text(json.dumps({"question_id": 1, "text": "SENTINEL"}) + '\n{"question_id": 2, "te')
    with caplog.at_level(logging.WARNING):
        answers = generate_answers(
            model, processor, questions, tmp_path, batch_size=2, max_new_tokens=3, predictions_path=answers_path
        )
    assert [a["question_id"] for a in answers] == [0, 1, 2]  # 3 skipped: its image is missing
    assert answers[1]["text"] == "SENTINEL"  # answered before: not generated again
    assert "question 3" in caplog.text and "gone.png" in caplog.text
    lines = [json.loads(line) for line in answers_path.read_text().splitlines()]
    assert sorted(r["question_id"] for r in lines) == [0, 1, 2]
    with pytest.raises(MissingImageError, match=r"question 3.*gone\.png"):
        generate_answers(model, processor, questions, tmp_path, max_new_tokens=2, on_missing_image="error")


def test_cli_scores_existing_predictions(question_file, tmp_path, capsys):
    from deco_models.cli import main

    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(
        "".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in enumerate(["Yes.", "No", "No"]))
    )
    out = tmp_path / "pope.json"
    assert main(["eval", "--task", "pope", "--data", str(question_file), "--predictions", str(predictions),
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert result["metrics"]["recall"] == 0.5
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_generates_with_a_saved_model(tiny, question_file, tmp_path):
    from deco_models.cli import main

    model, processor = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "results.json"
    args = ["eval", "--task", "pope", "--data", str(question_file), "--model", str(model_dir),
            "--image-folder", str(tmp_path), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["n_scored"] == 3 and set(result["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    answers = (tmp_path / "results.answers.jsonl").read_text().splitlines()
    assert len(answers) == 3
    assert main(args) == 0  # resume: everything answered, nothing regenerated
    assert (tmp_path / "results.answers.jsonl").read_text().splitlines() == answers


def _request(*args):
    # lmms-eval's Instance exposes its arguments as `.args`; used only when lmms-eval is not installed.
    return SimpleNamespace(args=args)


def test_lmms_plugin_entry_point_and_one_request(tiny):
    import torch
    from PIL import Image

    from deco_models.eval import lmms_plugin
    from tests.tiny import tiny_image

    module_name, attr = lmms_plugin.ENTRY_POINT.split(":")
    target = getattr(importlib.import_module(module_name), attr)
    if lmms_plugin.HAVE_LMMS_EVAL:
        from lmms_eval.api.instance import Instance
        from lmms_eval.api.model import lmms

        manifest = target()
        assert manifest.model_id == "deco" and issubclass(lmms_plugin.DecoLMMS, lmms)

        def request(*args):
            meta = {"task": args[4], "doc_id": args[3], "repeats": 1}
            return Instance(request_type="generate_until", arguments=args, idx=0, metadata=meta)
    else:
        with pytest.raises(ImportError, match="lmms-eval"):
            target()
        request = _request
    from importlib.metadata import entry_points

    registered = [ep for ep in entry_points(group=lmms_plugin.ENTRY_POINT_GROUP) if ep.name == "deco"]
    assert all(ep.value == lmms_plugin.ENTRY_POINT for ep in registered)

    model, processor = tiny
    lm = lmms_plugin.DecoLMMS(model=model, processor=processor, device="cpu", batch_size=2, max_new_tokens=4)
    image = Image.fromarray(tiny_image(24, 40, 0))
    lm.task_dict = {"pope": {"test": {0: {"image": image}}}}
    to_visual = lambda doc: [doc["image"]]
    [text] = lm.generate_until(
        [request("what color ?", {"max_new_tokens": 4, "until": []}, to_visual, 0, "pope", "test")]
    )
    from deco_models.eval import generate_batch

    reference = generate_batch(model, processor, [processor.render_prompt("what color ?")], [image], max_new_tokens=4)[
        0
    ]
    assert text == reference
    first_word = reference.split(" ")[0]
    [cut] = lm.generate_until(
        [request("what color ?", {"max_new_tokens": 4, "until": [first_word]}, to_visual, 0, "pope", "test")]
    )
    assert cut == ""

    # loglikelihood = sum of the continuation's log-probs = -(mean NLL from the model's own loss) * length.
    [(logprob, _greedy)] = lm.loglikelihood([request("what color ?", " red", to_visual, 0, "pope", "test")])
    inputs = processor(text=processor.render_prompt("what color ?") + " red", images=image)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -1] = inputs["input_ids"][0, -1]
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert logprob == pytest.approx(-float(loss), rel=1e-4)

"""LLaVA-format data: records, label masking, images (pad, bad files), collation, length grouping."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deco_models.data import (
    IGNORE_INDEX,
    BadImageError,
    LengthGroupedSampler,
    LlavaCollator,
    LlavaConversationDataset,
    expand_to_square,
    length_grouped_indices,
    load_records,
    modality_length_grouped_indices,
)

COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}


def caption_record(color: str, index: int = 0) -> dict:
    return {
        "id": f"{color}-{index}",
        "image": f"{color}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the square ?"},
            {"from": "gpt", "value": f"a {color} square"},
        ],
    }


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import tiny_deco_model, tiny_processor

    model = tiny_deco_model("avgpool2_4")  # 4x4 patches -> M = 4 image tokens
    return model, tiny_processor(model)


@pytest.fixture()
def image_dir(tmp_path):
    for name, rgb in COLORS.items():
        Image.new("RGB", (40, 24), rgb).save(tmp_path / f"{name}.png")
    return tmp_path


def tokens(processor, ids) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


# --------------------------------------------------------------------------------------------------------- records


def test_load_records_json_and_jsonl_agree(tmp_path):
    records = [caption_record("red"), caption_record("blue")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_records(tmp_path / "d.json") == load_records(tmp_path / "d.jsonl") == records


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "x"}, "conversations"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, "'robot'"),
        ({"id": "x", "conversations": [{"value": "hi"}]}, "'from' and 'value'"),
        ({"id": "x", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "hi"}]}, "one image"),
    ],
)
def test_bad_records_are_named(tmp_path, record, message):
    (tmp_path / "d.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=message) as info:
        load_records(tmp_path / "d.json")
    assert "'x'" in str(info.value)


# ---------------------------------------------------------------------------------------------------- label masking


def test_vicuna_labels_cover_exactly_the_answer_and_eos(tiny, image_dir):
    _, processor = tiny
    ds = LlavaConversationDataset([caption_record("red")], image_dir, processor, "vicuna_v1")
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    assert int((ids == processor.image_token_id).sum()) == 4  # M image tokens
    trained = [int(t) for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tokens(processor, trained) == ["a", "red", "square", "</s>"]
    # Where labels are kept they equal the inputs (the model shifts them itself).
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert item["pixel_values"].shape == (3, 32, 32)


def test_plain_template_is_image_then_caption(tiny, image_dir):
    _, processor = tiny
    ds = LlavaConversationDataset([caption_record("green")], image_dir, processor, "plain")
    item = ds[0]
    assert tokens(processor, item["input_ids"]) == ["<s>", *["<image>"] * 4, "a", "green", "square", "\n"]
    assert item["labels"][:5].tolist() == [IGNORE_INDEX] * 5
    assert tokens(processor, item["labels"][5:]) == ["a", "green", "square", "\n"]


def test_multi_turn_masks_every_user_turn(tiny, image_dir):
    _, processor = tiny
    record = {
        "id": "mt",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "what color ?\n<image>"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape ?"},
            {"from": "gpt", "value": "a square"},
        ],
    }
    item = LlavaConversationDataset([record], image_dir, processor, "vicuna_v1")[0]
    trained = tokens(processor, [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE_INDEX])
    assert trained == ["red", "</s>", "a", "square", "</s>"]


def test_text_only_records_have_no_pixels_and_mix_in_a_batch(tiny, image_dir):
    model, processor = tiny
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "what shape ?"},
                                              {"from": "gpt", "value": "a circle"}]}
    ds = LlavaConversationDataset([caption_record("red"), text_only, caption_record("blue")], image_dir, processor,
                                  "vicuna_v1")
    assert ds[1]["pixel_values"] is None
    assert ds.modality_lengths[0] > 0 > ds.modality_lengths[1]
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # only the image records, in order
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_plain_template_rejects_text_only_records_up_front(tiny, image_dir):
    _, processor = tiny
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}
    with pytest.raises(ValueError, match="'t'.*plain"):
        LlavaConversationDataset([caption_record("red"), text_only], image_dir, processor, "plain")


def test_truncation_never_cuts_image_tokens(tiny, image_dir):
    _, processor = tiny
    item = LlavaConversationDataset([caption_record("red")], image_dir, processor, "plain", max_length=3)[0]
    assert int((item["input_ids"] == processor.image_token_id).sum()) == 4
    assert item["input_ids"].numel() == 5  # BOS + 4 image tokens: the image is kept whole
    item = LlavaConversationDataset([caption_record("red")], image_dir, processor, "plain", max_length=7)[0]
    assert item["input_ids"].numel() == 7


# ---------------------------------------------------------------------------------------------------------- images


def test_expand_to_square_centres_and_fills():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 3)) == (1, 2, 3)
    assert square.getpixel((0, 1)) == (255, 0, 0) and square.getpixel((3, 2)) == (255, 0, 0)


def test_pad_and_square_aspects_differ_on_a_wide_image(tiny, image_dir):
    _, processor = tiny
    padded = LlavaConversationDataset([caption_record("red")], image_dir, processor, "plain", image_aspect="pad")[0]
    squashed = LlavaConversationDataset([caption_record("red")], image_dir, processor, "plain",
                                        image_aspect="resize")[0]
    # Pad: the top rows are the mean-colour border (normalizes to ~0); resize: red everywhere.
    assert padded["pixel_values"][:, 0].abs().max() < 0.05
    assert torch.allclose(squashed["pixel_values"][:, 0], squashed["pixel_values"][:, 16], atol=1e-4)
    assert processor.image_aspect == "pad"  # the caller's processor is not modified


def test_missing_image_skip_counts_and_error_names_the_record(tiny, image_dir):
    _, processor = tiny
    records = [caption_record("red"), {**caption_record("red", 1), "image": "nope.png"}, caption_record("blue")]
    ds = LlavaConversationDataset(records, image_dir, processor, "plain", on_bad_image="skip")
    assert len(ds) == 2 and list(ds.bad_images) == ["red-1"]
    with pytest.raises(BadImageError, match="red-1.*nope.png"):
        LlavaConversationDataset(records, image_dir, processor, "plain", on_bad_image="error")


def test_corrupt_image_is_caught_in_getitem_or_up_front(tiny, image_dir):
    _, processor = tiny
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records = [caption_record("red"), {**caption_record("red", 1), "image": "broken.png"}, caption_record("blue")]
    # "exists" does not decode: the corrupt file is found while loading and the next record is served instead.
    ds = LlavaConversationDataset(records, image_dir, processor, "plain", on_bad_image="skip")
    assert len(ds) == 3
    item = ds[1]
    assert item["id"] == "blue-0" and "red-1" in ds.bad_images
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 3
    strict = LlavaConversationDataset(records, image_dir, processor, "plain", on_bad_image="error")
    with pytest.raises(BadImageError, match="red-1"):
        strict[1]
    # "decode" checks every image up front and drops the corrupt record before training.
    checked = LlavaConversationDataset(records, image_dir, processor, "plain", check_images="decode")
    assert len(checked) == 2 and "red-1" in checked.bad_images


# -------------------------------------------------------------------------------------------------------- collator


def test_collator_pads_right_and_left():
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": None},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None},
    ]
    right = LlavaCollator(pad_token_id=0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "pixel_values" not in right
    left = LlavaCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(items)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="pad_token_id"):
        LlavaCollator(pad_token_id=None)


# ------------------------------------------------------------------------------------------------ length grouping


def _batches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=1, max_size=80),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_length_grouping_is_a_permutation_sorted_within_megabatches(lengths, batch_size, world_size, seed):
    order = length_grouped_indices(lengths, batch_size, world_size, torch.Generator().manual_seed(seed))
    assert sorted(order) == list(range(len(lengths)))
    megabatch = batch_size * world_size
    for start in range(0, len(order), megabatch):
        chunk = order[start : start + megabatch]
        if len(chunk) == megabatch:
            # Every per-rank batch of a full megabatch holds `batch_size` samples.
            assert all(len(b) == batch_size for b in _batches(chunk, batch_size))
        if world_size == 1:
            assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)


@settings(max_examples=60, deadline=None)
@given(
    signs=st.lists(st.booleans(), min_size=2, max_size=60),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 1000),
    megabatch_mult=st.integers(1, 4),
)
def test_modality_grouping_keeps_batches_single_modality(signs, batch_size, seed, megabatch_mult):
    lengths = [(i % 17 + 1) * (1 if s else -1) for i, s in enumerate(signs)]
    generator = torch.Generator().manual_seed(seed)
    order = modality_length_grouped_indices(lengths, batch_size, 1, generator, megabatch_mult)
    assert sorted(order) == list(range(len(lengths)))
    n_image = sum(signs)
    n_text = len(signs) - n_image
    # All full batches except the single leftover megabatch (incomplete image + text remainders) are pure.
    mixed = [b for b in _batches(order, batch_size) if len({lengths[i] > 0 for i in b}) > 1]
    leftover = (n_image % batch_size or batch_size) + (n_text % batch_size or batch_size)
    assert sum(len(b) for b in mixed) <= leftover


def test_length_grouping_reduces_padding_compared_to_random():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (512,), generator=generator).tolist()

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in _batches(order, 8))

    grouped = length_grouped_indices(lengths, 8, 1, torch.Generator().manual_seed(1), megabatch_mult=16)
    shuffled = torch.randperm(512, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(grouped) < 0.5 * padding(shuffled)


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = [(-1) ** i * (i + 1) for i in range(40)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    first = list(sampler)
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=3)) == first  # a resumed run sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    with pytest.raises(ValueError):
        LengthGroupedSampler([], batch_size=4)

"""DecoProcessor (M image tokens, LLaVA pad/square, image modes, content box) and the chat templates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deco_models.conversation import (
    IGNORE_INDEX,
    render_conversation,
    render_prompt,
    render_training_example,
)
from deco_models.processing import DecoProcessor, load_image, pad_to_aspect
from tests.tiny import tiny_deco_model, tiny_processor, tiny_tokenizer

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def model():
    return tiny_deco_model("avgpool2_4")


@pytest.fixture(scope="module")
def processor(model):
    return tiny_processor(model)


# ----------------------------------------------------------------------------------------------- tokens


def test_inserts_exactly_m_image_tokens_per_image(processor):
    prompt = processor.render_prompt("what color ?")
    assert prompt == f"{SYSTEM} USER: <image>\nwhat color ? ASSISTANT:"
    inputs = processor(text=[prompt, "<image> and <image>"], images=[np.zeros((8, 8, 3), np.uint8)] * 3)
    counts = (inputs["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [4, 8]
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    # The image tokens are contiguous where the placeholder was.
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(processor.image_token_id)
    assert ids[first : first + 4] == [processor.image_token_id] * 4


def test_placeholder_count_must_match_images(processor):
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="no image here", images=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="<image> <image>", images=np.zeros((8, 8, 3), np.uint8))


def test_tokenizer_without_image_token_is_rejected(processor):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="no '<image>' token"):
        DecoProcessor(processor.image_processor, plain, num_image_tokens=4)


# ----------------------------------------------------------------------------------------------- pad / square


def test_pad_uses_mean_color_and_content_box(processor):
    fill = processor.fill_color
    assert fill == tuple(int(x * 255) for x in processor.image_processor.image_mean)  # LLaVA's expand2square colour
    image = np.zeros((20, 40, 3), np.uint8)  # wide: padded top and bottom by 10 px each -> 40x40 -> 32x32
    inputs = processor(text="<image>", images=image)
    info = inputs.image_info[0]
    assert info.content_box == (0.0, 8.0, 32.0, 24.0)
    assert info.original_size == (20, 40)
    assert info.model_image.shape == (32, 32, 3) and info.model_image.dtype == np.uint8
    # Far from the content edge the padding is exactly the mean colour; the content is black.
    assert (info.model_image[:6] == np.array(fill, np.uint8)).all()
    assert (info.model_image[-6:] == np.array(fill, np.uint8)).all()
    assert (info.model_image[10:22] == 0).all()
    # pixel_values are the normalized model image.
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    expected = (torch.from_numpy(info.model_image).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(inputs["pixel_values"][0], expected, rtol=1e-5, atol=1e-5)


def test_tall_image_box_and_square_mode(model):
    image = np.full((40, 10, 3), 200, np.uint8)
    pad = tiny_processor(model, image_aspect="pad").prepare_image(image)
    assert pad.content_box == (12.0, 0.0, 20.0, 32.0)  # canvas 40x40, x0 = 15 -> 15 * 0.8
    square = tiny_processor(model, image_aspect="square").prepare_image(image)
    assert square.content_box == (0.0, 0.0, 32.0, 32.0)
    assert (square.model_image == 200).all()


def test_pad_to_aspect_matches_expand2square():
    # LLaVA's expand2square: width > height -> paste at (0, (width - height) // 2) on a width x width canvas.
    rgb = np.arange(3 * 7 * 3, dtype=np.uint8).reshape(3, 7, 3)
    canvas, box = pad_to_aspect(rgb, (5, 5), (9, 9, 9))
    reference = Image.new("RGB", (7, 7), (9, 9, 9))
    reference.paste(Image.fromarray(rgb), (0, (7 - 3) // 2))
    assert np.array_equal(canvas, np.asarray(reference))
    assert box == (0, 2, 7, 5)
    same, box = pad_to_aspect(rgb, (3, 7), (0, 0, 0))  # already the target aspect: untouched
    assert same is rgb and box == (0, 0, 7, 3)
    wide, box = pad_to_aspect(np.zeros((4, 4, 3), np.uint8), (2, 4), (1, 1, 1))  # rectangular target 1:2
    assert wide.shape == (4, 8, 3) and box == (2, 0, 6, 4)


# ----------------------------------------------------------------------------------------------- image modes


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    assert load_image(values)[0, :, 0].tolist() == [0, 1, 128, 255]
    pil16 = Image.fromarray(values)  # mode I;16
    assert pil16.mode.startswith("I;16")
    assert load_image(pil16)[0, :, 1].tolist() == [0, 1, 128, 255]
    path = tmp_path / "depth16.png"
    pil16.save(path)
    assert load_image(path)[0, :, 2].tolist() == [0, 1, 128, 255]  # PIL may reopen it as mode I or I;16


def test_modes_convert_to_rgb():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)
    assert load_image(Image.fromarray(rgb)).tolist() == rgb.tolist()
    assert load_image(Image.fromarray(rgb).convert("L")).shape == (1, 2, 3)
    gray = np.array([[10, 250]], np.uint8)
    assert load_image(gray).tolist() == [[[10] * 3, [250] * 3]]
    assert load_image(gray[..., None]).tolist() == [[[10] * 3, [250] * 3]]
    # Transparency is composited onto white: a fully transparent pixel is white, an opaque one keeps its colour.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], np.uint8)
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]
    assert load_image(rgba).tolist() == out.tolist()
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert load_image(la)[0, 1].tolist() == [255, 255, 255]
    palette = Image.fromarray(rgb).convert("P")
    assert load_image(palette).tolist() == rgb.tolist()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert load_image(cmyk).tolist() == rgb.tolist()
    assert load_image(Image.fromarray(gray).convert("1"))[0, 1].tolist() == [255, 255, 255]
    floats = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert load_image(floats)[0, :, 0].tolist() == [0, 128, 255]
    assert load_image(Image.fromarray(floats, "F"))[0, :, 0].tolist() == [0, 128, 255]
    assert load_image(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    assert load_image(torch.zeros(2, 3, 3, dtype=torch.uint8)).shape == (2, 3, 3)


def test_bad_arrays_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2, 3), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="channels last"):
        load_image(np.zeros((3, 2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="0..65535"):
        load_image(np.full((2, 2), -1, np.int32))
    with pytest.raises(ValueError, match="unsupported image type"):
        load_image(12)


def test_corrupt_and_missing_files(tmp_path, processor):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="cannot read image file"):
        processor(text="<image>", images=str(bad))
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    assert load_image(tmp_path / "ok.jpg").shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------------- save / load


def test_processor_save_load_roundtrip(tmp_path, model):
    processor = tiny_processor(model, image_aspect="square", chat_template="plain")
    processor.save_pretrained(tmp_path)
    again = DecoProcessor.from_pretrained(tmp_path)
    assert (again.num_image_tokens, again.image_aspect, again.chat_template) == (4, "square", "plain")
    image = np.random.default_rng(1).integers(0, 255, (10, 30, 3), dtype=np.uint8)
    a, b = processor(text="<image> red", images=image), again(text="<image> red", images=image)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert type(again.image_processor).__name__.endswith("Pil")  # never the torchvision backend


def test_siglip_processor(tmp_path):
    model = tiny_deco_model("avgpool2_4", vision="siglip")
    processor = tiny_processor(model)
    assert processor.fill_color == (127, 127, 127)
    inputs = processor(text=processor.render_prompt("what ?"), images=np.zeros((5, 9, 3), np.uint8))
    assert model(**inputs).logits.isfinite().all()
    processor.save_pretrained(tmp_path)
    assert type(DecoProcessor.from_pretrained(tmp_path).image_processor).__name__ == "SiglipImageProcessorPil"


# ----------------------------------------------------------------------------------------------- templates


def test_render_prompt_exact_llava_strings():
    assert render_prompt("What is shown?", "vicuna_v1") == f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"
    assert render_prompt("Hi", "vicuna_v1", image=False) == f"{SYSTEM} USER: Hi ASSISTANT:"
    # A question that already holds the placeholder is left alone.
    assert render_prompt("<image>\nQ", "vicuna_v1") == f"{SYSTEM} USER: <image>\nQ ASSISTANT:"
    assert render_prompt("", "plain") == "<image>"
    assert render_prompt("Q", "plain") == "<image>\nQ\n"
    with pytest.raises(ValueError, match="unknown chat template"):
        render_prompt("Q", "llama_2")


def test_render_conversation_vicuna_multi_turn():
    conv = [
        {"from": "human", "value": "What color?\n<image>"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Shape?"},
        {"from": "gpt", "value": "A circle."},
    ]
    text, spans = render_conversation(conv, "vicuna_v1")
    assert text == f"{SYSTEM} USER: <image>\nWhat color? ASSISTANT: Red.</s>USER: Shape? ASSISTANT: A circle.</s>"
    assert [text[s:e] for s, e in spans] == ["Red.</s>", "A circle.</s>"]


def test_training_labels_cover_only_assistant_turns():
    tok = tiny_tokenizer()
    conv = [
        {"from": "human", "value": "<image>\nwhat color is the object ?"},
        {"from": "gpt", "value": "red circle"},
        {"from": "human", "value": "what shape ?"},
        {"from": "gpt", "value": "a circle"},
    ]
    ex = render_training_example(conv, "vicuna_v1", tok, num_image_tokens=4)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert ids == tok(render_conversation(conv, "vicuna_v1")[0].replace("<image>", "<image>" * 4))["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 4
    kept = [tok.convert_ids_to_tokens(t) for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert kept == ["red", "circle", "</s>", "a", "circle", "</s>"]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    assert labels[0] == IGNORE_INDEX  # BOS


def test_plain_training_example_and_text_only():
    tok = tiny_tokenizer()
    ex = render_training_example(
        [{"from": "human", "value": "<image>\nDescribe"}, {"from": "gpt", "value": "a red circle"}], "plain", tok, 4
    )
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    assert tokens == ["<s>"] + ["<image>"] * 4 + ["a", "red", "circle", "\n"]
    kept = [tok.convert_ids_to_tokens(t) for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert kept == ["a", "red", "circle", "\n"]
    text_only = render_training_example(
        [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "red"}], "vicuna_v1", tok
    )
    assert tok.convert_tokens_to_ids("<image>") not in text_only["input_ids"]
    assert [t for t, lab in zip(text_only["input_ids"], text_only["labels"]) if lab != IGNORE_INDEX] == [
        tok.convert_tokens_to_ids("red"),
        tok.eos_token_id,
    ]
    short = render_training_example(
        [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "red"}], "vicuna_v1", tok, max_length=5
    )
    assert len(short["input_ids"]) == len(short["labels"]) == 5


def test_bad_conversations():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="alternate"):
        render_training_example([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "vicuna_v1", tok)
    with pytest.raises(ValueError, match="'from'"):
        render_training_example([{"value": "a"}], "vicuna_v1", tok)
    with pytest.raises(ValueError, match="plain template"):
        render_training_example([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}], "plain", tok)


def test_processor_training_example_uses_its_m(processor):
    ex = processor.training_example(
        [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]
    )
    assert ex["input_ids"].count(processor.image_token_id) == processor.num_image_tokens


def test_label_mask_with_sentencepiece_style_offsets():
    # Llama's tokenizer (Metaspace) gives "▁red" the offsets of " red": the space belongs to "ASSISTANT: ", the
    # token to the answer. A word-level Metaspace tokenizer reproduces those offsets.
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in ("▁USER:", "▁ASSISTANT:", "▁what", "▁color", "▁?", "▁red", "▁circle"):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ex = render_training_example(
        [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "red circle"}], "vicuna_v1", tok
    )
    kept = [tok.convert_ids_to_tokens(t) for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert kept == ["▁red", "▁circle", "</s>"]

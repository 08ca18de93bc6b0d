"""deco_models.load / convert: every published layout, fabricated as a tiny copy in the exact on-disk layout from a
known model, loads back with the same logits; bad checkpoints fail with clear errors."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from deco_models.convert import (
    convert_llava_checkpoint,
    export_language_model,
    export_llava_lora,
    export_mm_projector,
    projector_state_from_llava,
    projector_state_to_llava,
)
from deco_models.loading import CheckpointError, detect_layout, load
from tests.tiny import (
    tiny_deco_model,
    tiny_image,
    tiny_image_processor,
    tiny_llava_hf_model,
    tiny_processor,
    tiny_tokenizer,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs(processor, question="what color is the object ?"):
    return processor(text=processor.render_prompt(question), images=tiny_image())


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------------------------- fabricators
# Written from the published layouts directly (file names, key names, config keys), not with deco_models.convert.


def _save_vision_tower(model, folder: Path) -> Path:
    model.model.vision_tower.save_pretrained(folder)
    tiny_image_processor("clip", 32).save_pretrained(folder)  # LLaVA takes the image processor from the tower
    return folder


def _llava_config(model, vision_dir, projector_type: str) -> dict:
    """liuhaotian/llava-v1.5-7b's config.json: the Llama config + LLaVA's mm_* keys."""
    text = model.config.text_config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    text.update(
        {
            "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": "pad",
            "mm_hidden_size": model.config.vision_config.hidden_size,
            "mm_projector_type": projector_type,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": str(vision_dir),
            "tune_mm_mlp_adapter": False,
            "use_mm_proj": True,
            "torch_dtype": "float32",
            "transformers_version": "4.31.0",
        }
    )
    return text


def _llava_llm_state(model) -> dict:
    """The LLM part of a deco model under LlavaLlamaForCausalLM's names (model.layers..., lm_head.weight)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model.") :]] = value.clone()
        elif key.startswith("lm_head."):
            out[key] = value.clone()
    return out


def _llava_projector_state(model, prefix="model.mm_projector.") -> dict:
    """The projector under LLaVA's names: nn.Sequential indices for mlp, DeCo's names for pooling."""
    spec = model.config.projector_type
    state = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    if spec.startswith("mlp"):
        state = {f"{2 * (int(k.split('.')[0].split('_')[1]) - 1)}.{k.split('.')[1]}": v for k, v in state.items()}
    return {prefix + k: v for k, v in state.items()}


def _fabricate_llava_original(model, folder: Path, vision_dir: Path) -> Path:
    """Sharded pytorch_model-0000X-of-00002.bin + index, config.json, tokenizer (no vision tower inside)."""
    folder.mkdir(parents=True)
    state = {**_llava_llm_state(model), **_llava_projector_state(model)}
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, folder / name)
        weight_map.update({k: name for k in names})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(_llava_config(model, vision_dir, model.config.projector_type)))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def _fabricate_base_llm(model, folder: Path) -> Path:
    """A vicuna-style base: LlamaForCausalLM folder + tokenizer."""
    llm = LlamaForCausalLM(model.config.text_config)
    llm.load_state_dict(_llava_llm_state(model))
    llm.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def _with_projector(model, donor):
    out = copy.deepcopy(model)
    out.model.multi_modal_projector.load_state_dict(donor.model.multi_modal_projector.state_dict())
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def source():
    """The known model every layout is made from, its processor, and inputs."""
    model = tiny_deco_model("avgpool2_4", seed=0)
    processor = tiny_processor(model)
    return model, processor, _inputs(processor)


@pytest.fixture(scope="module")
def vision_dir(source, workdir):
    return _save_vision_tower(source[0], workdir / "clip-vision")


@pytest.fixture(scope="module")
def base_dir(source, workdir):
    return _fabricate_base_llm(source[0], workdir / "vicuna")


# ----------------------------------------------------------------------------------------------- (a) deco


def test_deco_folder_roundtrip(source, workdir):
    model, processor, inputs = source
    folder = workdir / "deco"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert detect_layout(folder) == "deco"
    loaded, loaded_processor = load(folder, attn_implementation="eager")
    assert torch.equal(_logits(loaded, _inputs(loaded_processor)), _logits(model, inputs))
    assert loaded_processor.num_image_tokens == 4


# ----------------------------------------------------------------------------------------------- (b) llava-hf


def test_stock_llava_hf_loads_as_mlp2x_gelu(tmp_path):
    stock = tiny_llava_hf_model()
    stock.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(str(tmp_path))
    tiny_image_processor("clip", 32).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    assert detect_layout(tmp_path) == "llava_hf"
    model, processor = load(tmp_path, attn_implementation="eager")
    assert model.config.model_type == "deco" and model.config.projector_type == "mlp2x_gelu"
    inputs = _inputs(processor)
    assert int((inputs["input_ids"] == stock.config.image_token_id).sum()) == 16
    assert torch.equal(_logits(model, inputs), _logits(stock, inputs))

    # transformers saves llava-hf with the legacy names (language_model.model.*, vision_tower.*, ...); checkpoints
    # written by other versions use the in-memory names (model.language_model.*, lm_head.*): both load.
    state = load_file(tmp_path / "model.safetensors")
    legacy_prefixes = ("language_model.", "vision_tower.", "multi_modal_projector.")
    other = {}
    for key, value in state.items():
        if key.startswith("language_model.lm_head."):
            key = key[len("language_model.") :]
        elif key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model.") :]
        elif key.startswith(legacy_prefixes):
            key = "model." + key
        else:
            key = key.replace("model.language_model.", "language_model.model.").replace("model.", "", 1)
        other[key] = value
    assert set(other) != set(state)
    save_file(other, tmp_path / "model.safetensors")
    again, _ = load(tmp_path, attn_implementation="eager")
    assert torch.equal(_logits(again, inputs), _logits(stock, inputs))


# ----------------------------------------------------------------------------------------------- (c) original


@pytest.mark.parametrize("spec", ["mlp2x_gelu", "avgpool2_4"])
def test_original_llava_full_checkpoint(spec, workdir, tmp_path):
    model = tiny_deco_model(spec, seed=3)
    vision = _save_vision_tower(model, tmp_path / "vision")
    folder = _fabricate_llava_original(model, tmp_path / f"llava-v1.5-{spec}", vision)
    if spec == "mlp2x_gelu":
        assert (
            "model.mm_projector.2.weight"
            in json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
        )
    assert detect_layout(folder) == "llava_original"
    loaded, processor = load(folder, attn_implementation="eager")
    assert loaded.config.projector_type == spec and processor.image_aspect == "pad"
    inputs = _inputs(processor)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))

    # Conversion to a deco folder keeps the logits too.
    dst = convert_llava_checkpoint(folder, tmp_path / "converted", attn_implementation="eager")
    assert (dst / "model.safetensors").is_file() and detect_layout(dst) == "deco"
    again, again_processor = load(dst, attn_implementation="eager")
    assert torch.equal(_logits(again, _inputs(again_processor)), _logits(model, inputs))


def test_original_without_image_token_grows_vocab(tmp_path):
    # Original LLaVA has no <image> token: it is added after the vocabulary, the other logits are unchanged.
    model = tiny_deco_model("mlp2x_gelu", seed=4)
    vision = _save_vision_tower(model, tmp_path / "vision")
    folder = _fabricate_llava_original(model, tmp_path / "llava", vision)
    vocab = json.loads((folder / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {("image_slot" if k == "<image>" else k): v for k, v in vocab["model"]["vocab"].items()}
    vocab["added_tokens"] = [t for t in vocab["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(vocab))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("image_token", None)
    config.get("extra_special_tokens", {}) if isinstance(config.get("extra_special_tokens"), dict) else None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded, processor = load(folder, attn_implementation="eager")
    v = model.config.text_config.vocab_size
    assert loaded.config.text_config.vocab_size == v + 1 and processor.image_token_id == v
    text_only = processor(text=processor.render_prompt("what color ?", image=False))
    torch.testing.assert_close(_logits(loaded, text_only)[..., :v], _logits(model, text_only), rtol=0, atol=0)
    embed = loaded.get_input_embeddings().weight
    torch.testing.assert_close(embed[v], embed[:v].mean(0))


# ----------------------------------------------------------------------------------------------- (d) stage 1


def test_stage1_mm_projector(source, vision_dir, base_dir, tmp_path):
    model, _, inputs = source
    trained = tiny_deco_model("avgpool2_4", seed=7)  # the stage-1 projector comes from here
    stage1 = tmp_path / "llava-v1.5-7b-pretrain"
    stage1.mkdir()
    torch.save(_llava_projector_state(trained), stage1 / "mm_projector.bin")
    (stage1 / "config.json").write_text(json.dumps(_llava_config(model, vision_dir, "avgpool2_4")))
    assert detect_layout(stage1) == "mm_projector"
    expected = _logits(_with_projector(model, trained), inputs)
    loaded, processor = load(stage1, base=base_dir, attn_implementation="eager")
    assert processor.chat_template == "plain"
    assert torch.equal(_logits(loaded, inputs), expected)
    # The bare file, with the projector spec and vision tower given explicitly.
    bare, _ = load(
        stage1 / "mm_projector.bin",
        base=base_dir,
        vision_tower=vision_dir,
        projector_type="avgpool2_4",
        attn_implementation="eager",
    )
    assert torch.equal(_logits(bare, inputs), expected)
    # A full model as base: only its projector is replaced.
    deco_base = tmp_path / "deco-base"
    model.save_pretrained(deco_base)
    tiny_processor(model).save_pretrained(deco_base)
    over_full, _ = load(
        stage1 / "mm_projector.bin", base=deco_base, projector_type="avgpool2_4", attn_implementation="eager"
    )
    assert torch.equal(_logits(over_full, inputs), expected)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_export_mm_projector_roundtrip(source, vision_dir, base_dir, tmp_path, suffix):
    model, _, inputs = source
    trained = tiny_deco_model("avgpool2_4", seed=8)
    path = export_mm_projector(trained, tmp_path / f"mm_projector{suffix}")
    keys = sorted(torch.load(path, weights_only=True) if suffix == ".bin" else load_file(path))
    assert keys == sorted(_llava_projector_state(trained))
    loaded, _ = load(
        path, base=base_dir, vision_tower=vision_dir, projector_type="avgpool2_4", attn_implementation="eager"
    )
    assert torch.equal(_logits(loaded, inputs), _logits(_with_projector(model, trained), inputs))


# ----------------------------------------------------------------------------------------------- (e) LoRA


def _peft_reference_logits(model, projector_donor, peft_llm, inputs):
    """Un-merged reference: image features from the vision tower + projector, then the LoRA'd LLM via peft."""
    reference = _with_projector(model, projector_donor)
    with torch.no_grad():
        feats = reference.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        feats = torch.cat(list(feats), 0)
        embeds = peft_llm.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats)
        return peft_llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("adapter_format", ["safetensors", "bin"])
def test_llava_lora_checkpoint(source, vision_dir, base_dir, tmp_path, adapter_format):
    from peft import LoraConfig

    from deco_models.peft_compat import get_peft_model

    model, _, inputs = source
    trained = tiny_deco_model("avgpool2_4", seed=9)
    torch.manual_seed(1)
    llm = LlamaForCausalLM.from_pretrained(base_dir)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.05, task_type="CAUSAL_LM")
    peft_llm = get_peft_model(llm, lora_config).eval()
    with torch.no_grad():
        for name, param in peft_llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # LoRA B starts at zero: make the adapter matter
    folder = tmp_path / "llava-v1.5-7b-avgpool2_144-lora"
    peft_llm.save_pretrained(folder)
    if adapter_format == "bin":
        state = load_file(folder / "adapter_model.safetensors")
        (folder / "adapter_model.safetensors").unlink()
        torch.save(state, folder / "adapter_model.bin")
    adapter_keys = list(
        torch.load(folder / "adapter_model.bin", weights_only=True)
        if adapter_format == "bin"
        else load_file(folder / "adapter_model.safetensors")
    )
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter_keys
    torch.save(
        _llava_projector_state(trained, "base_model.model.model.mm_projector."), folder / "non_lora_trainables.bin"
    )
    (folder / "config.json").write_text(json.dumps(_llava_config(model, vision_dir, "avgpool2_4")))
    assert detect_layout(folder) == "llava_lora"

    expected = _peft_reference_logits(model, trained, peft_llm, inputs)
    loaded, processor = load(folder, base=base_dir, attn_implementation="eager")
    got = _logits(loaded, _inputs(processor))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _logits(_with_projector(model, trained), inputs), atol=1e-3)  # LoRA is applied


def test_export_llava_lora_roundtrip(source, tmp_path):
    from peft import LoraConfig

    from deco_models.peft_compat import get_peft_model

    model, processor, inputs = source
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
            modules_to_save=["multi_modal_projector"],
        ),
    ).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            if "modules_to_save" in name:
                param.add_(0.05)  # a "trained" projector that differs from the original module
    expected = _logits(peft_model, inputs)
    out = export_llava_lora(peft_model, tmp_path / "lora")
    names = sorted(p.name for p in out.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= set(names)
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "down_proj",
        "q_proj",
        "v_proj",
    ]
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.mm_projector.") for k in non_lora)
    assert any(
        k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
        for k in load_file(out / "adapter_model.safetensors")
    )
    base = export_language_model(model, tmp_path / "base-llm", tokenizer=processor.tokenizer)
    loaded, loaded_processor = load(out, base=base, attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded, _inputs(loaded_processor)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_missing_and_misshaped_tensors_are_named(source, vision_dir, tmp_path):
    model = source[0]
    folder = _fabricate_llava_original(model, tmp_path / "broken", vision_dir)
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    dropped = sorted(state)[0]
    del state[dropped]
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="missing 1 tensor") as err:
        load(folder)
    assert dropped in str(err.value)

    folder2 = _fabricate_llava_original(model, tmp_path / "misshaped", vision_dir)
    shard = next(
        p
        for p in folder2.glob("pytorch_model-*.bin")
        if "model.mm_projector.mlp_projector.0.weight" in torch.load(p, weights_only=True)
    )
    state = torch.load(shard, weights_only=True)
    state["model.mm_projector.mlp_projector.0.weight"] = torch.zeros(5, 7)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"wrong shape.*mlp_projector\.0\.weight.*\(5, 7\).*expected \(32, 32\)"):
        load(folder2)


class _NotATensor:
    def __reduce__(self):  # what a malicious pickle would run on load: never executed with weights_only=True
        return (print, ("pwned",))


def test_pickles_with_objects_are_refused(source, vision_dir, base_dir, tmp_path):
    model = source[0]
    evil = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.mlp_projector.0.weight": torch.zeros(32, 32), "x": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load(evil, base=base_dir, vision_tower=vision_dir, projector_type="avgpool2_4")
    plain = tmp_path / "plain.bin"
    torch.save({**_llava_projector_state(model), "model.mm_projector.step": 3}, plain)
    with pytest.raises(CheckpointError, match="non-tensor entries: 'model.mm_projector.step' \\(int\\)"):
        load(plain, base=base_dir, vision_tower=vision_dir, projector_type="avgpool2_4")
    assert pickle.dumps(1)  # keep the import honest: pickle itself is not used to load anything


def test_layout_errors(tmp_path, base_dir):
    with pytest.raises(ValueError, match="Supported layouts"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="Supported layouts"):
        load(tmp_path)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="mm_projector_type"):
        load(lora, base=base_dir)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2)}, stage1 / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="base="):
        load(stage1)


def test_projector_key_mapping_roundtrip():
    linear = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    assert sorted(projector_state_from_llava(linear, "linear")) == ["linear_1.bias", "linear_1.weight"]
    mlp3 = {f"{i}.weight": torch.ones(1) for i in (0, 2, 4)}
    named = projector_state_from_llava(mlp3, "mlp3x_gelu")
    assert sorted(named) == ["linear_1.weight", "linear_2.weight", "linear_3.weight"]
    assert sorted(projector_state_to_llava(named, "mlp3x_gelu")) == sorted(mlp3)
    deco = {"mlp_projector.0.weight": torch.ones(1), "mlp_projector.2.bias": torch.ones(1)}
    assert projector_state_from_llava(deco, "avgpool2_144") == deco
    with pytest.raises(ValueError, match="unexpected keys"):
        projector_state_from_llava({"mlp_projector.0.weight": torch.ones(1)}, "mlp2x_gelu")


# ----------------------------------------------------------------------------------------------- command line


def test_cli_convert_and_generate(source, vision_dir, tmp_path, capsys):
    from deco_models.cli import main

    model = source[0]
    folder = _fabricate_llava_original(model, tmp_path / "llava", vision_dir)
    assert main(["convert", str(folder), "--detect-only"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "llava_original"
    assert main(["convert", str(folder), str(tmp_path / "deco")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dst"] == str(tmp_path / "deco")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(tiny_image()).save(image)
    args = ["generate", "--model", str(tmp_path / "deco"), "--image", str(image), "--prompt", "what color ?"]
    assert main([*args, "--max-new-tokens", "3", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt"].endswith("USER: <image>\nwhat color ? ASSISTANT:")
    # Greedy decoding of the converted model is the source model's greedy decoding.
    processor = tiny_processor(model)
    inputs = processor(text=result["prompt"], images=str(image))
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=3)
    answer = processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert result["answer"] == answer


def test_deco_folder_errors_name_keys(source, tmp_path):
    model = source[0]
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.multi_modal_projector.mlp_projector.2.bias")
    state["model.multi_modal_projector.mlp_projector.0.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "missing 1 tensor(s): 'model.multi_modal_projector.mlp_projector.2.bias'" in message
    assert "'model.multi_modal_projector.mlp_projector.0.weight' is (2, 2), expected (32, 32)" in message

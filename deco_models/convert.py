"""Conversion between deco models and the published LLaVA / llava-hf / DeCo checkpoint layouts.

Key mapping (deco = :class:`~deco_models.modeling.DecoForConditionalGeneration` state dict):

===================================  ==========================================  ==================================
deco key                             original LLaVA-1.5 / DeCo key               llava-hf key (legacy / current)
===================================  ==========================================  ==================================
``model.language_model.X``           ``model.X`` (embed_tokens, layers.*, norm)  ``language_model.model.X`` /
                                                                                 ``model.language_model.X``
``lm_head.weight``                   ``lm_head.weight``                          ``language_model.lm_head.weight``
                                                                                 / ``lm_head.weight``
``model.vision_tower.Y``             not saved: loaded from ``mm_vision_tower``  ``vision_tower.Y`` /
                                     (or ``model.vision_tower.vision_tower.Y``)  ``model.vision_tower.Y``
``model.multi_modal_projector.``     ``model.mm_projector.{2K-2}.*`` (an         ``multi_modal_projector.``
``linear_K.*`` (``mlp{N}x_gelu``)    nn.Sequential, GELUs at odd indices)        ``linear_K.*``
``model.multi_modal_projector.``     ``model.mm_projector.weight/bias``          n/a
``linear_1.*`` (``linear``)          (a bare nn.Linear)
``model.multi_modal_projector.Z``    ``model.mm_projector.Z`` (DeCo's names,     n/a
(pooling, Q-Former, abstractors)     e.g. ``mlp_projector.0.weight``)
===================================  ==========================================  ==================================

Stage-1 ``mm_projector.bin`` holds only the ``model.mm_projector.*`` keys. LoRA checkpoints (LLaVA's
``--lora_enable``, e.g. ``yaolily/llava-v1.5-7b-avgpool2_144-lora``) prefix everything with ``base_model.model.``:
``adapter_model.*`` holds ``base_model.model.model.layers.N.<module>.lora_A.weight`` / ``lora_B.weight`` and
``non_lora_trainables.bin`` holds ``base_model.model.model.mm_projector.*`` (plus any other trained non-LoRA
tensor under the same naming). Config keys: ``mm_projector_type`` <-> ``projector_type``, ``mm_vision_tower`` (a
path or name of the vision model), ``mm_hidden_size`` (vision width), ``mm_vision_select_layer`` <->
``vision_feature_layer``, ``mm_vision_select_feature`` ``patch``/``cls_patch`` <-> ``vision_feature_select_strategy``
``default``/``full``, ``image_aspect_ratio`` ``pad`` <-> the processor's ``image_aspect``.

Original LLaVA has no ``<image>`` entry in its vocabulary (it splices features at a placeholder index -200); the
converted model adds ``<image>`` to the tokenizer and, if the id falls outside the embedding table, appends one
row to the input and output embeddings (the mean of the existing rows, as llava-hf's conversion did). All other
logits are unchanged.

Example:
    >>> from deco_models.convert import projector_state_from_llava
    >>> import torch
    >>> sorted(projector_state_from_llava({"0.weight": torch.zeros(2, 2), "2.weight": torch.zeros(2, 2)}, "mlp2x_gelu"))
    ['linear_1.weight', 'linear_2.weight']
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from deco_models.io import atomic_write
from rgae.io import normal_file_modes

MM_PROJECTOR_PREFIX = "model.mm_projector."
LORA_PREFIX = "base_model.model."
DECO_PROJECTOR_PREFIX = "model.multi_modal_projector."
DECO_LLM_PREFIX = "model.language_model."
DECO_VISION_PREFIX = "model.vision_tower."


# ------------------------------------------------------------------------------------------ projector keys


def _projector_kind(projector_type: str) -> str:
    from deco_models.projectors import parse_projector_spec

    return parse_projector_spec(projector_type).kind


def projector_state_from_llava(state: dict, projector_type: str) -> dict:
    """LLaVA ``mm_projector`` tensors (keys relative to ``mm_projector.``) -> deco projector keys.

    Example:
        >>> import torch
        >>> sorted(projector_state_from_llava({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, "linear"))
        ['linear_1.bias', 'linear_1.weight']
    """
    kind = _projector_kind(projector_type)
    if kind == "linear":
        unknown = sorted(set(state) - {"weight", "bias"})
        if unknown:
            raise ValueError(f"'linear' mm_projector holds only weight/bias, got unexpected keys {unknown}")
        return {f"linear_1.{k}": v for k, v in state.items()}
    if kind == "mlp":
        from deco_models.projectors.mlp import llava_sequential_to_named

        unknown = sorted(k for k in state if not re.fullmatch(r"\d+\.(weight|bias)", k))
        if unknown:
            raise ValueError(
                f"{projector_type!r} mm_projector is an nn.Sequential (keys '0.weight', '2.weight', ...); "
                f"got unexpected keys {unknown}"
            )
        return llava_sequential_to_named(state)
    return dict(state)


def projector_state_to_llava(state: dict, projector_type: str) -> dict:
    """Deco projector tensors -> LLaVA ``mm_projector`` keys (inverse of :func:`projector_state_from_llava`)."""
    kind = _projector_kind(projector_type)
    out = {}
    for key, value in state.items():
        found = re.fullmatch(r"linear_(\d+)\.(weight|bias)", key)
        if kind == "linear" and found:
            out[found.group(2)] = value
        elif kind == "mlp" and found:
            out[f"{2 * (int(found.group(1)) - 1)}.{found.group(2)}"] = value
        elif kind in ("linear", "mlp"):
            raise ValueError(f"unexpected {projector_type!r} projector key {key!r}")
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ llava-hf keys

_LLAVA_HF_RENAMES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", DECO_LLM_PREFIX),
    ("language_model.", DECO_LLM_PREFIX),
    ("vision_tower.", DECO_VISION_PREFIX),
    ("multi_modal_projector.", DECO_PROJECTOR_PREFIX),
)


def llava_hf_to_deco_key(key: str) -> str:
    """A llava-hf checkpoint key (any transformers version's layout) -> the deco key.

    Example:
        >>> llava_hf_to_deco_key("language_model.model.layers.0.mlp.up_proj.weight")
        'model.language_model.layers.0.mlp.up_proj.weight'
        >>> llava_hf_to_deco_key("model.multi_modal_projector.linear_1.weight")
        'model.multi_modal_projector.linear_1.weight'
    """
    if key.startswith(("model.", "lm_head.")):
        return key
    for old, new in _LLAVA_HF_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def llava_llm_to_deco_key(key: str) -> str:
    """An original-LLaVA / HF causal-LM key (``model.layers.0...``, ``lm_head.weight``) -> the deco key."""
    if key.startswith("model."):
        return DECO_LLM_PREFIX + key[len("model.") :]
    return key


def deco_llm_to_causal_lm_key(key: str) -> str | None:
    """Deco key -> HF causal-LM key (``model.layers...``/``lm_head.weight``); None for non-LLM keys."""
    if key.startswith(DECO_LLM_PREFIX):
        return "model." + key[len(DECO_LLM_PREFIX) :]
    if key.startswith("lm_head."):
        return key
    return None


# ------------------------------------------------------------------------------------------ helpers


def unwrap_deco_model(model):
    """The :class:`DecoForConditionalGeneration` inside a PeftModel / DDP / Trainer wrapper (or the model itself)."""
    from deco_models.modeling import DecoForConditionalGeneration

    if isinstance(model, DecoForConditionalGeneration):
        return model
    if isinstance(model, torch.nn.Module):
        for module in model.modules():  # peft, DDP and Trainer wrappers hold the model as a submodule
            if isinstance(module, DecoForConditionalGeneration):
                return module
    raise ValueError(f"expected a DecoForConditionalGeneration (or a peft/DDP wrapper of one), got {type(model)}")


def _active_projector_state(model) -> dict:
    """The projector's tensors as the model uses them (peft ``modules_to_save`` copy when there is one)."""
    deco = unwrap_deco_model(model)
    projector = deco.model.multi_modal_projector
    # peft's ModulesToSaveWrapper: the trained copy lives in modules_to_save[active_adapter].
    if hasattr(projector, "modules_to_save") and hasattr(projector, "active_adapter"):
        active = projector.active_adapter
        active = active[0] if isinstance(active, list | tuple) else active
        projector = projector.modules_to_save[active]
    elif hasattr(projector, "original_module") and not hasattr(projector, "kind"):
        projector = projector.original_module
    return {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}


def _write_tensors(path: Path, tensors: dict) -> Path:
    """``.safetensors`` with safetensors, anything else with ``torch.save`` of a plain {name: tensor} dict."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _write_json(path: Path, payload: dict) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def llava_text_architecture(text_model_type: str) -> tuple[str, str]:
    """(LLaVA ``model_type``, ``architectures[0]``) used in exported configs for a text model type."""
    if text_model_type == "qwen2":
        return "llava_qwen2", "LlavaQwen2ForCausalLM"
    if text_model_type == "mistral":
        return "llava_mistral", "LlavaMistralForCausalLM"
    return "llava", "LlavaLlamaForCausalLM"


def llava_config_dict(config, vision_tower: str = "", image_aspect: str = "pad") -> dict:
    """An original-LLaVA ``config.json`` dict for a DecoConfig: the text config plus the ``mm_*`` keys."""
    text = config.text_config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    model_type, arch = llava_text_architecture(config.text_config.model_type)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("the LLaVA layout has one mm_vision_select_layer; this model concatenates several layers")
    text.update(
        {
            "model_type": model_type,
            "architectures": [arch],
            "mm_projector_type": config.projector_type,
            "mm_hidden_size": config.vision_config.hidden_size,
            "mm_vision_tower": str(vision_tower),
            "mm_vision_select_layer": layer,
            "mm_vision_select_feature": "patch" if config.vision_feature_select_strategy == "default" else "cls_patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "use_mm_proj": True,
            "image_aspect_ratio": image_aspect,
            "image_token_index": config.image_token_index,
            "projector_kwargs": dict(config.projector_kwargs or {}),
        }
    )
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        text["torch_dtype"] = str(dtype).replace("torch.", "")
    return text


# ------------------------------------------------------------------------------------------ exports


def export_mm_projector(model, path) -> Path:
    """Write the projector in LLaVA's stage-1 ``mm_projector.bin`` layout (``model.mm_projector.*`` keys).

    ``path`` ending in ``.safetensors`` writes safetensors, anything else a ``torch.save`` of plain tensors (loadable
    with ``weights_only=True``). ``model``: a deco model or a peft/DDP wrapper of one.

    Example:
        >>> from tests.tiny import tiny_deco_model
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_mm_projector(tiny_deco_model("mlp2x_gelu"), os.path.join(d, "mm_projector.bin"))
        ...     sorted(torch.load(p, weights_only=True))[:2]
        ['model.mm_projector.0.bias', 'model.mm_projector.0.weight']
    """
    deco = unwrap_deco_model(model)
    state = projector_state_to_llava(_active_projector_state(model), deco.config.projector_type)
    return _write_tensors(Path(path), {MM_PROJECTOR_PREFIX + k: v for k, v in state.items()})


def _lora_key_to_llava(key: str) -> str | None:
    """peft key of a LoRA'd deco model -> LLaVA's adapter key; None for non-LoRA keys.

    ``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
    """
    if "lora_" not in key:
        return None
    key = re.sub(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+(\.weight|\.bias)?$", r".\1\2", key)
    inner = key[len(LORA_PREFIX) :] if key.startswith(LORA_PREFIX) else key
    if not inner.startswith(DECO_LLM_PREFIX):
        raise ValueError(
            f"LoRA tensor {key!r} is outside the language model; the LLaVA layout only has LoRA on the LLM"
        )
    return LORA_PREFIX + llava_llm_from_deco(inner)


def llava_llm_from_deco(key: str) -> str:
    causal = deco_llm_to_causal_lm_key(key)
    if causal is None:
        raise ValueError(f"{key!r} is not a language-model key")
    return causal


def export_llava_lora(peft_model, out_dir, vision_tower: str | None = None, image_aspect: str = "pad") -> Path:
    """Write a LoRA-tuned deco model in the published LLaVA LoRA layout (as ``yaolily/llava-v1.5-7b-*-lora``).

    Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA tensors, LLaVA key names),
    ``non_lora_trainables.bin`` (``torch.save`` of plain tensors) and ``non_lora_trainables.safetensors`` (the
    projector under ``base_model.model.model.mm_projector.*`` plus every other trainable non-LoRA tensor),
    ``config.json`` (LLaVA layout). The vision tower is saved under ``out_dir/vision_tower`` unless ``vision_tower``
    names one; ``mm_vision_tower`` is that path (relative paths are resolved against the checkpoint folder by
    :func:`deco_models.load`). Load it back with ``deco_models.load(out_dir, base=<the base LLM folder>)``.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"export_llava_lora expects a peft PeftModel wrapping a deco model, got {type(peft_model)}")
    deco = unwrap_deco_model(peft_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_name = peft_model.active_adapter
    adapter_name = adapter_name[0] if isinstance(adapter_name, list | tuple) else adapter_name
    peft_config = peft_model.peft_config[adapter_name]

    lora, lora_modules, non_lora = {}, set(), {}
    for key, value in peft_model.state_dict().items():
        if "lora_" in key and f".{adapter_name}." in key + ".":
            llava_key = _lora_key_to_llava(key)
            lora[llava_key] = value
            lora_modules.add(re.sub(r"\.lora_.*$", "", llava_key).rsplit(".", 1)[-1])
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    for name, param in sorted(trainable.items()):
        inner = name[len(LORA_PREFIX) :] if name.startswith(LORA_PREFIX) else name
        if inner.startswith(DECO_PROJECTOR_PREFIX):
            continue  # written below from the active projector copy
        inner = re.sub(r"\.modules_to_save\.[^.]+\.|\.original_module\.", ".", inner)
        if inner.startswith(DECO_VISION_PREFIX):
            # LLaVA's CLIPVisionTower wraps the vision model as model.vision_tower.vision_tower.
            non_lora[LORA_PREFIX + "model.vision_tower.vision_tower." + inner[len(DECO_VISION_PREFIX) :]] = param
            continue
        causal = deco_llm_to_causal_lm_key(inner)
        if causal is None:
            raise ValueError(f"trainable tensor {name!r} has no place in the LLaVA LoRA layout")
        non_lora[LORA_PREFIX + causal] = param
    projector = projector_state_to_llava(_active_projector_state(peft_model), deco.config.projector_type)
    non_lora.update({LORA_PREFIX + MM_PROJECTOR_PREFIX + k: v for k, v in projector.items()})

    config_dict = peft_config.to_dict()
    config_dict["target_modules"] = sorted(lora_modules)
    config_dict["modules_to_save"] = None
    config_dict["base_model_name_or_path"] = None
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    _write_json(out_dir / "adapter_config.json", json.loads(json.dumps(config_dict, default=str)))
    _write_tensors(out_dir / "adapter_model.safetensors", lora)
    _write_tensors(out_dir / "non_lora_trainables.bin", non_lora)
    _write_tensors(out_dir / "non_lora_trainables.safetensors", non_lora)
    if vision_tower is None:
        with normal_file_modes(out_dir):  # safetensors writes owner-only files
            deco.model.vision_tower.save_pretrained(out_dir / "vision_tower")
        vision_tower = "vision_tower"
    _write_json(out_dir / "config.json", llava_config_dict(deco.config, vision_tower, image_aspect))
    return out_dir


def export_language_model(model, out_dir, tokenizer=None) -> Path:
    """Save a deco model's LLM as a plain HF causal LM folder (``LlamaForCausalLM``/``Qwen2ForCausalLM`` ...), the
    ``base=`` that LLaVA-layout LoRA and stage-1 checkpoints are loaded against."""
    from transformers import AutoModelForCausalLM

    deco = unwrap_deco_model(model)
    state = {}
    for key, value in deco.state_dict().items():
        causal = deco_llm_to_causal_lm_key(key)
        if causal is not None:
            state[causal] = value.detach()
    llm = AutoModelForCausalLM.from_config(deco.config.text_config).to(next(iter(state.values())).dtype)
    missing, unexpected = llm.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if deco.config.text_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"cannot export the language model: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with normal_file_modes(out_dir):  # safetensors writes owner-only files
        llm.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ------------------------------------------------------------------------------------------ conversion


def convert_llava_checkpoint(src, dst, base=None, **load_kwargs) -> Path:
    """Convert any layout :func:`deco_models.load` understands into a deco folder (``model.safetensors``,
    ``config.json`` with ``model_type: deco``, processor files).

    Example:
        >>> convert_llava_checkpoint("llava-v1.5-7b", "llava-v1.5-7b-deco")  # doctest: +SKIP
    """
    from deco_models.loading import load

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty; choose a new folder")
    model, processor = load(src, base=base, **load_kwargs)
    dst.mkdir(parents=True, exist_ok=True)
    with normal_file_modes(dst):  # safetensors writes owner-only files
        model.save_pretrained(dst, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(dst)
    return dst


__all__ = [
    "convert_llava_checkpoint",
    "export_language_model",
    "export_llava_lora",
    "export_mm_projector",
    "llava_config_dict",
    "llava_hf_to_deco_key",
    "llava_llm_to_deco_key",
    "projector_state_from_llava",
    "projector_state_to_llava",
    "unwrap_deco_model",
]

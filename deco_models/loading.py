"""``deco_models.load``: one loader for every checkpoint layout, detected from the files.

Layouts (see :mod:`deco_models.convert` for the key mapping):

- ``deco``: a folder saved by ``DecoForConditionalGeneration.save_pretrained`` (``config.json`` model_type ``deco``);
- ``llava_hf``: a stock llava-hf folder (model_type ``llava`` with ``vision_config``/``text_config``): an
  ``mlp2x_gelu`` deco model;
- ``llava_original``: an original LLaVA-1.5 / DeCo full checkpoint (``liuhaotian/llava-v1.5-7b``: model_type
  ``llava`` with ``mm_projector_type``, ``mm_vision_tower``, ...; LLM weights ``model.layers...``, ``lm_head``,
  ``model.mm_projector.*``); the vision tower is loaded from ``mm_vision_tower``;
- ``mm_projector``: a stage-1 ``mm_projector.bin``/``.safetensors`` (a file, or a folder holding it with LLaVA's
  ``config.json``), with ``base=`` the LLM (or any full model whose projector it replaces);
- ``llava_lora``: LLaVA's LoRA output (``adapter_config.json``, ``adapter_model.*``, ``non_lora_trainables.bin``,
  ``config.json``) with ``base=`` the LLM, e.g. ``yaolily/llava-v1.5-7b-avgpool2_144-lora`` over vicuna-7b-v1.5;
  LoRA is merged with peft;
- ``zoo``: a name from :mod:`deco_models.zoo` (``shapes-mini-avgpool2_36``, ...).

Pickle files are read only through :func:`deco_models.io.load_state_dict` (``weights_only=True``). Missing,
unexpected or wrongly shaped tensors raise :class:`CheckpointError` (a ValueError) naming the keys and shapes.

Example:
    >>> import deco_models
    >>> model, processor = deco_models.load("path/to/llava-v1.5-7b", dtype=torch.float16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deco_models.convert import (
    DECO_VISION_PREFIX,
    LORA_PREFIX,
    MM_PROJECTOR_PREFIX,
    llava_hf_to_deco_key,
    llava_llm_to_deco_key,
    projector_state_from_llava,
)

logger = logging.getLogger(__name__)

LAYOUTS = {
    "deco": "a deco folder (config.json with model_type 'deco')",
    "llava_hf": "a llava-hf folder (config.json with model_type 'llava' and vision_config/text_config)",
    "llava_original": "an original LLaVA-1.5/DeCo checkpoint (config.json with mm_projector_type/mm_vision_tower and "
    "LLM weights)",
    "mm_projector": "a stage-1 mm_projector.bin/.safetensors (file or folder), with base= an LLM or a full model",
    "llava_lora": "a LLaVA LoRA folder (adapter_config.json, adapter_model.*, non_lora_trainables.bin, config.json), "
    "with base= the LLM",
    "zoo": "a deco_models.zoo model name",
}
LLAVA_ORIGINAL_TYPES = ("llava", "llava_llama", "llava_qwen", "llava_qwen2", "llava_mistral")
# LLaVA's training-only config keys: not part of the text model's config.
_LLAVA_ONLY_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "image_token_index",
    "projector_kwargs",
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
}
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_MM_PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


class CheckpointError(ValueError):
    """A checkpoint does not match the model it should load into (names the keys and shapes)."""


# ----------------------------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def weight_files(folder) -> list[Path]:
    """The weight files of a HF-style folder (sharded index first, then single files); [] if none."""
    folder = Path(folder)
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shard files that do not exist: {missing}")
            return [folder / s for s in shards]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(folder.glob("model-*-of-*.safetensors")) or sorted(folder.glob("pytorch_model-*-of-*.bin"))
    return shards


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Tensors of one file (safetensors, or weights-only torch pickle); every value must be a tensor."""
    from deco_models.io import load_state_dict

    state = load_state_dict(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
    bad = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in list(bad.items())[:8])
        raise CheckpointError(f"{path} holds non-tensor entries: {shown}; expected a flat dict of tensors")
    return state


def read_state_dict(folder) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files, merged (progress bar over shards)."""
    files = weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder} has no weight files (looked for {', '.join(_WEIGHT_INDEXES + _WEIGHT_FILES)} and shards)"
        )
    state = {}
    iterator = files
    if len(files) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc=f"reading {Path(folder).name}", unit="shard")
    for file in iterator:
        part = read_tensors(file)
        clash = set(part) & set(state)
        if clash:
            raise CheckpointError(f"tensor(s) {sorted(clash)[:5]} appear in more than one shard of {folder}")
        state.update(part)
    return state


def checkpoint_shapes(folder) -> dict[str, tuple[int, ...]] | None:
    """{key: shape} from the safetensors headers of a folder, without reading tensors; None if not all-safetensors."""
    files = weight_files(folder)
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


# ----------------------------------------------------------------------------------------------- detection


def detect_layout(path_or_name) -> str:
    """Which layout a path (or zoo name) is: one of :data:`LAYOUTS`' keys; ValueError listing them otherwise.

    Example:
        >>> detect_layout("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: ...
    """
    path = Path(path_or_name)
    if not path.exists():
        if _zoo_has(str(path_or_name)):
            return "zoo"
        raise ValueError(f"{path_or_name!r} is neither an existing path nor a zoo model name. {_layouts_help()}")
    if path.is_file():
        if path.suffix in (".bin", ".safetensors", ".pt", ".pth"):
            return "mm_projector"
        raise ValueError(f"{path} is a file but not a .bin/.safetensors projector file. {_layouts_help()}")
    if (path / "adapter_config.json").is_file():
        return "llava_lora"
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    has_projector_file = any((path / f).is_file() for f in _MM_PROJECTOR_FILES)
    if config is None:
        if has_projector_file:
            return "mm_projector"
        raise ValueError(f"{path} has no config.json. {_layouts_help()}")
    model_type = config.get("model_type")
    if model_type == "deco":
        return "deco"
    if model_type == "llava" and ("text_config" in config or "vision_config" in config):
        return "llava_hf"
    if model_type in LLAVA_ORIGINAL_TYPES or "mm_vision_tower" in config or "mm_projector_type" in config:
        if weight_files(path):
            return "llava_original"
        if has_projector_file:
            return "mm_projector"
        raise ValueError(f"{path} has a LLaVA config.json but neither LLM weights nor mm_projector.bin")
    raise ValueError(f"{path}: config.json model_type {model_type!r} is no multimodal layout. {_layouts_help()}")


def _layouts_help() -> str:
    return "Supported layouts: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())


def _zoo_has(name: str) -> bool:
    try:
        from deco_models import zoo
    except ImportError:
        return False
    check = getattr(zoo, "is_zoo_name", None)
    return bool(check and check(name))


# ----------------------------------------------------------------------------------------------- checking


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from deco_models.modeling import DecoForConditionalGeneration

    with torch.device("meta"):
        model = DecoForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_state_dict(config, state: dict, sources: dict | None = None, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` if ``state`` does not fit a deco model of ``config`` exactly.

    ``state`` maps keys to tensors or to shapes; ``sources`` maps deco keys to the key names in the original file,
    quoted in the message.
    """
    sources = sources or {}
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state.items()}
    expected = _expected_shapes(config)
    optional = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(k for k in state if k in expected and shapes[k] != expected[k])

    def name(k):
        return f"{k!r} (file key {sources[k]!r})" if k in sources and sources[k] != k else repr(k)

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(name(k) for k in missing[:10]))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(name(k) for k in unexpected[:10]))
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) with the wrong shape: "
            + ", ".join(f"{name(k)} is {shapes[k]}, expected {expected[k]}" for k in mismatched[:10])
        )
    if problems:
        raise CheckpointError(
            f"{where} does not match a {config.projector_type!r} deco model "
            f"(vision {config.vision_config.model_type}, text {config.text_config.model_type}): " + "; ".join(problems)
        )


def _float_dtype(state: dict) -> torch.dtype:
    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    return torch.float32


def instantiate(config, state: dict, dtype=None, device=None, attn_implementation=None, sources=None, where=""):
    """Build a deco model for ``config`` holding exactly ``state`` (checked first, see :func:`verify_state_dict`)."""
    from deco_models.modeling import DecoForConditionalGeneration

    verify_state_dict(config, state, sources, where or "checkpoint")
    kwargs = {"dtype": dtype or _float_dtype(state)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model, info = DecoForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, output_loading_info=True, **kwargs
    )
    leftovers = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if config.text_config.tie_word_embeddings and "missing_keys" in leftovers:
        leftovers["missing_keys"] = set(leftovers["missing_keys"]) - {"lm_head.weight"}
        if not leftovers["missing_keys"]:
            leftovers.pop("missing_keys")
    if leftovers or info.get("error_msgs"):
        raise CheckpointError(f"{where or 'checkpoint'}: transformers reported {leftovers or info['error_msgs']}")
    if device is not None:
        model = model.to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------- processors


def default_image_processor(vision_config):
    """The CLIP / SigLIP (PIL backend) image processor for a vision config's input size and backbone."""
    from deco_models.configuration import _pair

    h, w = _pair(vision_config.image_size, "image_size")
    if vision_config.model_type.startswith("siglip"):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(size={"height": h, "width": w})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})


def ensure_image_token(tokenizer, image_token: str = "<image>") -> tuple[int, bool]:
    """Make sure ``image_token`` is a (special) token of ``tokenizer``; returns ``(id, added)``."""
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is not None and token_id != unk:
        return int(token_id), False
    tokenizer.add_tokens([image_token], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(image_token)), True


def _build_processor(tokenizer, image_processor, config, image_aspect="pad", chat_template="vicuna_v1"):
    from deco_models.processing import DecoProcessor

    return DecoProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_aspect=image_aspect,
        chat_template=chat_template,
    )


def _processor_for_folder(folder: Path, config, image_aspect=None, chat_template=None):
    from transformers import AutoTokenizer

    from deco_models.processing import PROCESSOR_CONFIG_NAME, DecoProcessor, load_image_processor

    overrides = {k: v for k, v in (("image_aspect", image_aspect), ("chat_template", chat_template)) if v}
    if (folder / PROCESSOR_CONFIG_NAME).is_file():
        processor = DecoProcessor.from_pretrained(folder, **overrides)
        if processor.num_image_tokens != config.num_image_tokens:
            raise CheckpointError(
                f"{folder}: processor inserts {processor.num_image_tokens} image tokens but the model's projector "
                f"outputs {config.num_image_tokens}"
            )
        return processor
    if not _has_tokenizer(folder):
        logger.warning("%s has no tokenizer files: returning processor=None", folder)
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if (folder / "preprocessor_config.json").is_file():
        image_processor = load_image_processor(folder)
    else:
        image_processor = default_image_processor(config.vision_config)
    return _build_processor(tokenizer, image_processor, config, image_aspect or "pad", chat_template or "vicuna_v1")


# ----------------------------------------------------------------------------------------------- parts


@dataclass
class _Parts:
    """What a multimodal model is assembled from (original-LLaVA style checkpoints)."""

    text_config: object = None
    llm_state: dict = field(default_factory=dict)  # causal-LM keys: model.layers..., lm_head.weight
    tokenizer: object = None
    vision_config: object = None
    vision_state: dict = field(default_factory=dict)  # vision model keys (no prefix)
    image_processor: object = None
    sources: dict = field(default_factory=dict)


def _text_config_from_llava(config: dict):
    from transformers import AutoConfig

    model_type = config.get("model_type", "llava")
    arch = " ".join(config.get("architectures") or [])
    if "qwen" in model_type or "Qwen" in arch:
        text_type = "qwen2"
    elif "mistral" in model_type or "Mistral" in arch:
        text_type = "mistral"
    else:
        text_type = "llama"
    text = {k: v for k, v in config.items() if k not in _LLAVA_ONLY_KEYS and not k.startswith("mm_")}
    return AutoConfig.for_model(text_type, **text)


def _resolve_path(ref: str, checkpoint_dir: Path | None) -> Path | None:
    candidate = Path(ref)
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for root in ([checkpoint_dir] if checkpoint_dir else []) + [Path.cwd()]:
        if (root / candidate).exists():
            return root / candidate
    return None


def _vision_parts(ref: str | None, checkpoint_dir: Path | None, parts: _Parts) -> None:
    """Load the vision tower named by ``mm_vision_tower`` (a folder; a hub name only where the hub is reachable)."""
    from transformers import AutoConfig, AutoModel

    if not ref:
        raise CheckpointError(
            "no vision tower: the checkpoint's config has no mm_vision_tower; pass vision_tower=PATH to a "
            "CLIP/SigLIP vision model folder"
        )
    path = _resolve_path(str(ref), checkpoint_dir)
    target = str(path) if path is not None else str(ref)
    try:
        config = AutoConfig.from_pretrained(target)
        if getattr(config, "vision_config", None) is not None:
            config = config.vision_config
        model, info = AutoModel.from_pretrained(target, config=config, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load the vision tower {ref!r} (mm_vision_tower): {exc}. Pass vision_tower=PATH to a local "
            "CLIP/SigLIP vision model folder"
        ) from None
    if info.get("missing_keys"):
        raise CheckpointError(f"vision tower {target}: missing tensors {sorted(info['missing_keys'])[:10]}")
    parts.vision_config = model.config
    parts.vision_state = {k: v for k, v in model.state_dict().items()}
    if path is not None and (path / "preprocessor_config.json").is_file():
        from deco_models.processing import load_image_processor

        parts.image_processor = load_image_processor(path)


def _llm_parts_from_folder(folder: Path, parts: _Parts) -> None:
    from transformers import AutoConfig, AutoTokenizer

    parts.text_config = AutoConfig.from_pretrained(str(folder))
    parts.llm_state = read_state_dict(folder)
    if _has_tokenizer(folder):
        parts.tokenizer = AutoTokenizer.from_pretrained(str(folder))


def _parts_from_full_model(model, processor, parts: _Parts) -> None:
    from deco_models.convert import deco_llm_to_causal_lm_key

    state = model.state_dict()
    parts.text_config = model.config.text_config
    parts.llm_state = {deco_llm_to_causal_lm_key(k): v for k, v in state.items() if deco_llm_to_causal_lm_key(k)}
    parts.vision_config = model.config.vision_config
    parts.vision_state = {k[len(DECO_VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(DECO_VISION_PREFIX)}
    if processor is not None:
        parts.tokenizer = processor.tokenizer
        parts.image_processor = processor.image_processor


def _base_parts(base, **load_kwargs) -> tuple[_Parts, bool]:
    """Parts from ``base``: a plain causal-LM folder (no vision) or any full multimodal layout.
    Returns (parts, has_vision)."""
    if base is None:
        raise CheckpointError("this layout needs base= (the LLM folder, e.g. vicuna-7b-v1.5, or a full model)")
    parts = _Parts()
    base_path = Path(base)
    if base_path.is_dir() and (base_path / "config.json").is_file():
        model_type = _read_json(base_path / "config.json").get("model_type")
        config = _read_json(base_path / "config.json")
        multimodal = model_type == "deco" or "mm_vision_tower" in config or "vision_config" in config
        if not multimodal:
            _llm_parts_from_folder(base_path, parts)
            return parts, False
    model, processor = load(base, **load_kwargs)
    _parts_from_full_model(model, processor, parts)
    return parts, True


# ----------------------------------------------------------------------------------------------- assembly


def _append_mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)], dim=0)


def _assemble(
    parts: _Parts,
    projector_type: str,
    projector_state: dict,
    llava_config: dict,
    dtype,
    device,
    attn_implementation,
    image_aspect,
    chat_template,
    where: str,
):
    """Deco model + processor from LLaVA-style parts; ``projector_state`` keys are relative to mm_projector."""
    from deco_models.configuration import DecoConfig

    if parts.tokenizer is None:
        raise CheckpointError(f"{where}: no tokenizer found (looked in the checkpoint and base folders)")
    tokenizer = parts.tokenizer
    image_token_id, added = ensure_image_token(tokenizer)
    text_config = parts.text_config
    vocab = text_config.vocab_size
    llm_state = dict(parts.llm_state)
    if image_token_id >= vocab:
        # The new <image> row: mean of the existing embeddings (never looked up: image features replace it).
        extra = image_token_id + 1 - vocab
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in llm_state:
                llm_state[key] = _append_mean_rows(llm_state[key], extra)
        text_config.vocab_size = image_token_id + 1
        logger.info(
            "added %r as token %d; embeddings grown from %d to %d rows",
            "<image>",
            image_token_id,
            vocab,
            text_config.vocab_size,
        )
    elif added:
        logger.info("added '<image>' as token %d (inside the existing %d-row embedding table)", image_token_id, vocab)

    mm_hidden = llava_config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != parts.vision_config.hidden_size:
        raise CheckpointError(
            f"{where}: mm_hidden_size is {mm_hidden} but the vision tower's hidden size is "
            f"{parts.vision_config.hidden_size}: wrong mm_vision_tower?"
        )
    select = llava_config.get("mm_vision_select_feature", "patch")
    from deco_models.configuration import vision_prefix_tokens

    prefix = vision_prefix_tokens(parts.vision_config)
    strategy = "full" if (select == "cls_patch" or prefix == 0) else "default"
    config = DecoConfig(
        vision_config=parts.vision_config,
        text_config=text_config,
        projector_type=projector_type,
        projector_kwargs=llava_config.get("projector_kwargs") or {},
        image_token_index=image_token_id,
        vision_feature_layer=llava_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    state, sources = {}, dict(parts.sources)
    for key, value in llm_state.items():
        deco_key = llava_llm_to_deco_key(key)
        state[deco_key] = value
        sources.setdefault(deco_key, key)
    for key, value in parts.vision_state.items():
        state[DECO_VISION_PREFIX + key] = value
    for key, value in projector_state_from_llava(projector_state, projector_type).items():
        state["model.multi_modal_projector." + key] = value
    model = instantiate(config, state, dtype, device, attn_implementation, sources=sources, where=where)
    image_processor = parts.image_processor or default_image_processor(config.vision_config)
    if image_aspect is None:
        image_aspect = "pad" if llava_config.get("image_aspect_ratio", "pad") == "pad" else "square"
    processor = _build_processor(tokenizer, image_processor, config, image_aspect, chat_template or "vicuna_v1")
    return model, processor


def _split_llava_state(state: dict, where: str) -> tuple[dict, dict, dict]:
    """Original-LLaVA keys -> (llm (causal-LM keys), projector (relative to mm_projector), vision (no prefix))."""
    llm, projector, vision, unknown = {}, {}, {}, []
    vision_prefix = "model.vision_tower.vision_tower."
    for key, value in state.items():
        if key.startswith(MM_PROJECTOR_PREFIX):
            projector[key[len(MM_PROJECTOR_PREFIX) :]] = value
        elif key.startswith(vision_prefix):
            inner = key[len(vision_prefix) :]
            vision[inner[len("vision_model.") :] if inner.startswith("vision_model.") else inner] = value
        elif key.startswith(("model.", "lm_head.")):
            llm[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {unknown[:10]}; LLaVA checkpoints hold model.*, lm_head.* and "
            "model.mm_projector.* keys"
        )
    return llm, projector, vision


def _merge_vision_override(parts: _Parts, override: dict, where: str) -> None:
    if not override:
        return
    # Vision tower tensors saved inside the checkpoint (an unfrozen tower) win over mm_vision_tower's.
    current = set(parts.vision_state)
    normalized = {}
    for key, value in override.items():
        if key not in current and f"vision_model.{key}" in current:
            key = f"vision_model.{key}"
        normalized[key] = value
    unknown = sorted(set(normalized) - current)
    if unknown:
        raise CheckpointError(f"{where}: vision tower tensors {unknown[:10]} do not exist in the vision model")
    parts.vision_state.update(normalized)


# ----------------------------------------------------------------------------------------------- layouts


def _load_deco(path: Path, dtype, device, attn_implementation, image_aspect, chat_template):
    from deco_models.configuration import DecoConfig
    from deco_models.modeling import DecoForConditionalGeneration

    config = DecoConfig.from_pretrained(str(path))
    shapes = checkpoint_shapes(path)
    if shapes is None:  # .bin weights: read (weights-only) and check them in memory
        model = instantiate(config, read_state_dict(path), dtype, device, attn_implementation, where=str(path))
        return model, _processor_for_folder(path, config, image_aspect, chat_template)
    # safetensors: check names/shapes from the headers, then let transformers stream the weights in.
    verify_state_dict(config, shapes, where=str(path))
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = DecoForConditionalGeneration.from_pretrained(str(path), config=config, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), _processor_for_folder(path, config, image_aspect, chat_template)


def _load_llava_hf(path: Path, dtype, device, attn_implementation, image_aspect, chat_template):
    from transformers import LlavaConfig

    from deco_models.configuration import DecoConfig

    llava = LlavaConfig.from_pretrained(str(path))
    if llava.projector_hidden_act != "gelu":
        raise CheckpointError(
            f"{path}: projector_hidden_act is {llava.projector_hidden_act!r}; only llava-hf's 'gelu' MLP is an "
            "mlp2x_gelu deco model"
        )
    data = llava.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    data["projector_type"] = "mlp2x_gelu"
    config = DecoConfig.from_dict(data)
    raw = read_state_dict(path)
    state, sources = {}, {}
    for key, value in raw.items():
        new = llava_hf_to_deco_key(key)
        state[new] = value
        sources[new] = key
    model = instantiate(config, state, dtype, device, attn_implementation, sources=sources, where=str(path))
    return model, _processor_for_folder(path, config, image_aspect, chat_template)


def _load_llava_original(path: Path, dtype, device, attn_implementation, image_aspect, chat_template, vision_tower):
    from transformers import AutoTokenizer

    llava_config = _read_json(path / "config.json")
    projector_type = llava_config.get("mm_projector_type", "linear")
    llm, projector, vision = _split_llava_state(read_state_dict(path), str(path))
    parts = _Parts(text_config=_text_config_from_llava(llava_config), llm_state=llm)
    if _has_tokenizer(path):
        parts.tokenizer = AutoTokenizer.from_pretrained(str(path))
    _vision_parts(vision_tower or llava_config.get("mm_vision_tower"), path, parts)
    _merge_vision_override(parts, vision, str(path))
    return _assemble(
        parts,
        projector_type,
        projector,
        llava_config,
        dtype,
        device,
        attn_implementation,
        image_aspect,
        chat_template,
        str(path),
    )


def _load_mm_projector(
    path: Path, base, dtype, device, attn_implementation, image_aspect, chat_template, vision_tower, projector_type
):
    if path.is_file():
        file, folder = path, path.parent
    else:
        folder = path
        file = next((path / f for f in _MM_PROJECTOR_FILES if (path / f).is_file()), None)
        if file is None:
            raise CheckpointError(f"{path} has no {' or '.join(_MM_PROJECTOR_FILES)}")
    llava_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    raw = read_tensors(file)
    projector = {}
    for key, value in raw.items():
        inner = key[len(LORA_PREFIX) :] if key.startswith(LORA_PREFIX) else key
        if not inner.startswith(MM_PROJECTOR_PREFIX):
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; a stage-1 file holds model.mm_projector.* only")
        projector[inner[len(MM_PROJECTOR_PREFIX) :]] = value
    projector_type = projector_type or llava_config.get("mm_projector_type")
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    parts, has_vision = _base_parts(base, **load_kwargs)
    if not has_vision:
        _vision_parts(vision_tower or llava_config.get("mm_vision_tower"), folder, parts)
    if projector_type is None:
        raise CheckpointError(f"{file}: unknown projector type; pass projector_type= or keep LLaVA's config.json")
    if not llava_config:
        llava_config = {"mm_vision_select_layer": -2}
    return _assemble(
        parts,
        projector_type,
        projector,
        llava_config,
        dtype,
        device,
        attn_implementation,
        image_aspect,
        chat_template or "plain",
        str(file),
    )


def _load_llava_lora(path: Path, base, dtype, device, attn_implementation, image_aspect, chat_template, vision_tower):
    from peft import LoraConfig, set_peft_model_state_dict
    from transformers import AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from deco_models.peft_compat import get_peft_model

    llava_config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    projector_type = llava_config.get("mm_projector_type")
    if projector_type is None:
        raise CheckpointError(f"{path}: config.json with mm_projector_type is needed to rebuild the projector")
    adapter_file = next(
        (path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).is_file()), None
    )
    if adapter_file is None:
        raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    non_lora_file = next(
        (path / f for f in ("non_lora_trainables.safetensors", "non_lora_trainables.bin") if (path / f).is_file()),
        None,
    )
    if non_lora_file is None:
        raise CheckpointError(f"{path}: no non_lora_trainables.bin (it holds the trained projector)")

    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    parts, has_vision = _base_parts(base, **load_kwargs)
    if parts.tokenizer is None and _has_tokenizer(path):
        parts.tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not has_vision:
        _vision_parts(vision_tower or llava_config.get("mm_vision_tower"), path, parts)

    # non_lora_trainables: LLaVA strips 'base_model.' then 'model.' prefixes -> model.mm_projector.*, model.*.
    non_lora = {}
    for key, value in read_tensors(non_lora_file).items():
        non_lora[key[len(LORA_PREFIX) :] if key.startswith(LORA_PREFIX) else key] = value
    llm_override, projector, vision_override = _split_llava_state(non_lora, str(non_lora_file))
    if not projector:
        raise CheckpointError(f"{non_lora_file}: no model.mm_projector.* tensors (the trained projector)")
    unknown = sorted(set(llm_override) - set(parts.llm_state))
    if unknown:
        raise CheckpointError(f"{non_lora_file}: language-model tensors {unknown[:10]} do not exist in the base LLM")
    llm_state = {**parts.llm_state, **llm_override}
    _merge_vision_override(parts, vision_override, str(non_lora_file))

    # Merge the LoRA into the LLM with peft, exactly as LLaVA's builder does (base + non-LoRA, then LoRA, merge).
    llm_dtype = dtype or _float_dtype(llm_state)
    llm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(parts.text_config)]
    llm = llm_class.from_pretrained(None, config=parts.text_config, state_dict=llm_state, dtype=llm_dtype)
    lora_config = LoraConfig.from_pretrained(str(path))
    lora_config.inference_mode = True
    lora_config.base_model_name_or_path = llm.name_or_path  # the LLM is given explicitly (base=), not by name
    peft_llm = get_peft_model(llm, lora_config)
    adapter_state = read_tensors(adapter_file)
    outside = [k for k in adapter_state if "lora_" not in k]
    if outside:
        raise CheckpointError(f"{adapter_file}: non-LoRA tensors {outside[:10]} in the adapter file")
    try:
        result = set_peft_model_state_dict(peft_llm, adapter_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{adapter_file}: LoRA tensors do not fit the base LLM: {exc}") from None
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise CheckpointError(
            f"{adapter_file}: LoRA tensors do not match the base LLM: unexpected {sorted(result.unexpected_keys)[:10]}"
            f", missing {sorted(missing_lora)[:10]} (is base= the LLM this adapter was trained on?)"
        )
    merged = peft_llm.merge_and_unload()
    parts.llm_state = {k: v for k, v in merged.state_dict().items()}
    return _assemble(
        parts,
        projector_type,
        projector,
        llava_config,
        dtype,
        device,
        attn_implementation,
        image_aspect,
        chat_template,
        str(path),
    )


# ----------------------------------------------------------------------------------------------- entry point


def load(
    path_or_name,
    base=None,
    dtype: torch.dtype | None = None,
    device=None,
    *,
    attn_implementation: str | None = None,
    vision_tower: str | None = None,
    projector_type: str | None = None,
    image_aspect: str | None = None,
    chat_template: str | None = None,
):
    """Load any supported checkpoint as ``(DecoForConditionalGeneration, DecoProcessor)`` in eval mode.

    Args:
        path_or_name: a folder or file in one of the layouts of :data:`LAYOUTS`, or a zoo model name.
        base: the LLM folder (or a full model) for stage-1 ``mm_projector`` and LoRA checkpoints.
        dtype / device: where the weights go (default: the checkpoint's dtype, CPU).
        attn_implementation: e.g. ``"eager"`` (what the explainers need) or ``"sdpa"``.
        vision_tower: a local vision model folder overriding the checkpoint's ``mm_vision_tower``.
        projector_type: the spec of a bare ``mm_projector.bin`` without LLaVA's config.json.
        image_aspect / chat_template: processor overrides (``"pad"``/``"square"``, ``"plain"``/``"vicuna_v1"``).

    Example:
        >>> from tests.tiny import tiny_deco_model, tiny_processor
        >>> import tempfile
        >>> model = tiny_deco_model("avgpool2_4")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     model.save_pretrained(d); tiny_processor(model).save_pretrained(d)
        ...     loaded, processor = load(d)
        >>> loaded.config.projector_type, processor.num_image_tokens
        ('avgpool2_4', 4)
    """
    from rgae.verbosity import quiet_loading

    # No "Loading weights" bar per from_pretrained (a zoo model makes three); --verbose / set_verbosity_info shows them.
    with quiet_loading():
        return _load(path_or_name, base, dtype, device, attn_implementation, vision_tower, projector_type,
                     image_aspect, chat_template)


def _load(path_or_name, base, dtype, device, attn_implementation, vision_tower, projector_type, image_aspect,
          chat_template):
    layout = detect_layout(path_or_name)
    if layout == "zoo":
        from deco_models import zoo

        model, processor = zoo.load(str(path_or_name), attn_implementation=attn_implementation or "eager")
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval(), processor
    path = Path(path_or_name)
    common = (dtype, device, attn_implementation, image_aspect, chat_template)
    if layout == "deco":
        return _load_deco(path, *common)
    if layout == "llava_hf":
        return _load_llava_hf(path, *common)
    if layout == "llava_original":
        return _load_llava_original(path, *common, vision_tower)
    if layout == "mm_projector":
        return _load_mm_projector(path, base, *common, vision_tower, projector_type)
    return _load_llava_lora(path, base, *common, vision_tower)


__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "default_image_processor",
    "detect_layout",
    "ensure_image_token",
    "instantiate",
    "load",
    "read_state_dict",
    "read_tensors",
    "checkpoint_shapes",
    "verify_state_dict",
    "weight_files",
]

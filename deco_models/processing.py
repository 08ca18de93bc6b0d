"""DecoProcessor: tokenizer + image processor that puts exactly M image tokens per ``<image>``, with LLaVA's image
handling, and reports what the explainers need to map relevance back onto the picture.

Images: any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...), numpy arrays (uint8, uint16, bool, float in [0, 1];
HxW, HxWx1, HxWx3, HxWx4) or file paths are converted to 8-bit RGB (16-bit scaled by 255/65535, never clipped;
transparency composited onto white). Then ``image_aspect``:

- ``"pad"`` (LLaVA-1.5's ``expand2square``): the image is centred on a canvas of the model's aspect ratio (a square for
  square inputs) filled with the image processor's mean colour ``int(255 * mean)``, then resized;
- ``"square"``: plain resize to the model's input size (the aspect ratio is not kept).

The transformers image processor (CLIP/SigLIP, PIL backend: no torchvision) then only rescales and normalizes, so
``model_images`` are exactly the pixels the model saw, and ``content_boxes`` say where the original image lies in them.

Example:
    >>> import numpy as np
    >>> from tests.tiny import tiny_deco_model, tiny_processor  # doctest: +SKIP
    >>> proc = tiny_processor(tiny_deco_model("avgpool2_4"))  # doctest: +SKIP
    >>> inputs = proc(text=proc.render_prompt("What?"), images=np.zeros((20, 40, 3), np.uint8))  # doctest: +SKIP
    >>> inputs.image_info[0].content_box  # doctest: +SKIP
    (0.0, 8.0, 32.0, 24.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from deco_models.conversation import get_template, render_prompt, render_training_example
from rgae.images import load_image

PROCESSOR_CONFIG_NAME = "deco_processor_config.json"
IMAGE_ASPECTS = ("pad", "square")


# --------------------------------------------------------------------------------------------- pad / resize


@dataclass(frozen=True)
class ImageInfo:
    """What the model saw for one image.

    ``model_image``: uint8 HxWx3, after pad/resize (before normalization). ``content_box``: (x0, y0, x1, y1) of the
    original picture inside ``model_image``, in pixels (floats; the rest is padding). ``original_size``: (h, w).
    """

    model_image: np.ndarray
    content_box: tuple[float, float, float, float]
    original_size: tuple[int, int]


def pad_to_aspect(rgb: np.ndarray, target_hw: tuple[int, int], fill: tuple[int, int, int]):
    """Centre ``rgb`` on a ``fill``-coloured canvas with the aspect ratio of ``target_hw`` (LLaVA's expand2square
    for square targets). Returns ``(canvas, (x0, y0, x1, y1))`` with the box of the original in canvas pixels.

    Example:
        >>> import numpy as np
        >>> canvas, box = pad_to_aspect(np.zeros((2, 4, 3), np.uint8), (8, 8), (1, 2, 3))
        >>> canvas.shape, box, canvas[0, 0].tolist()
        ((4, 4, 3), (0, 1, 4, 3), [1, 2, 3])
    """
    h, w = rgb.shape[:2]
    th, tw = target_hw
    # Canvas: the smallest one with the target's aspect ratio that contains the image (integer arithmetic).
    if w * th >= h * tw:
        cw, ch = w, max(h, round(w * th / tw))
    else:
        ch, cw = h, max(w, round(h * tw / th))
    if (ch, cw) == (h, w):
        return rgb, (0, 0, w, h)
    canvas = np.empty((ch, cw, 3), dtype=np.uint8)
    canvas[...] = np.asarray(fill, dtype=np.uint8)
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = rgb
    return canvas, (x0, y0, x0 + w, y0 + h)


def _size_of(image_processor) -> tuple[int, int]:
    """The (h, w) the model's vision tower expects, from the image processor's crop/size settings."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None and crop.get("height"):
        return int(crop["height"]), int(crop["width"])
    size = getattr(image_processor, "size", None) or {}
    if size.get("height"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"cannot tell the input size from image processor {type(image_processor).__name__}: {size}")


def _pil_image_processor_class(image_processor_type: str | None):
    """The PIL-backend (torchvision-free) image processor class for a saved ``image_processor_type``."""
    name = (image_processor_type or "").lower()
    if name.startswith("siglip"):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil
    if name.startswith("clip") or not name:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    return None


def load_image_processor(path):
    """Load a saved image processor with the PIL backend (never the torchvision one)."""
    config_file = Path(path) / "preprocessor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no preprocessor_config.json (no image processor saved there)")
    kind = json.loads(config_file.read_text()).get("image_processor_type")
    cls = _pil_image_processor_class(kind)
    if cls is not None:
        return cls.from_pretrained(str(path))
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), backend="pil")


# ------------------------------------------------------------------------------------------------- processor


class DecoProcessor:
    """Tokenizer + image processor for deco models: ``<image>`` -> M image tokens, LLaVA image handling.

    Args:
        image_processor: a transformers CLIP/SigLIP image processor (PIL backend recommended); only its rescale and
            normalize steps and its mean colour and target size are used (resizing is done here, see module doc).
        tokenizer: a fast tokenizer containing ``image_token``.
        num_image_tokens: M, the projector's output length (``model.config.num_image_tokens``).
        image_aspect: ``"pad"`` (LLaVA-1.5) or ``"square"``.
        chat_template: ``"plain"`` or ``"vicuna_v1"`` (see :mod:`deco_models.conversation`).
        image_token: the placeholder string.

    Calling it returns a :class:`transformers.BatchFeature` (``input_ids``, ``attention_mask``, ``pixel_values``)
    ready for ``model(**inputs)`` / ``model.generate(**inputs)``, with an ``image_info`` attribute (not a key):
    one :class:`ImageInfo` per image.

    Example:
        >>> from tests.tiny import tiny_deco_model, tiny_processor  # doctest: +SKIP
        >>> model = tiny_deco_model("avgpool2_4"); proc = tiny_processor(model)  # doctest: +SKIP
        >>> inputs = proc(text=proc.render_prompt("What?"), images=np.zeros((8, 8, 3), np.uint8))  # doctest: +SKIP
        >>> int((inputs["input_ids"] == proc.image_token_id).sum())  # doctest: +SKIP
        4
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_image_tokens: int,
        image_aspect: str = "pad",
        chat_template: str = "vicuna_v1",
        image_token: str = "<image>",
    ):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        get_template(chat_template)
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int (the projector's M), got {num_image_tokens!r}")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token first")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_aspect = image_aspect
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = int(image_token_id)

    # ------------------------------------------------------------------ images
    @property
    def image_size(self) -> tuple[int, int]:
        """(h, w) of the images fed to the vision tower."""
        return _size_of(self.image_processor)

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """LLaVA's padding colour: ``tuple(int(x * 255) for x in image_processor.image_mean)``."""
        return tuple(int(x * 255) for x in self.image_processor.image_mean)

    def prepare_image(self, image) -> ImageInfo:
        """Convert, pad (``"pad"``) and resize one image to what the model sees."""
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"empty image of size {h}x{w}")
        th, tw = self.image_size
        if self.image_aspect == "pad":
            canvas, (x0, y0, x1, y1) = pad_to_aspect(rgb, (th, tw), self.fill_color)
        else:
            canvas, (x0, y0, x1, y1) = rgb, (0, 0, w, h)
        ch, cw = canvas.shape[:2]
        if (ch, cw) != (th, tw):
            resample = int(getattr(self.image_processor, "resample", Image.Resampling.BICUBIC))
            canvas = np.array(Image.fromarray(canvas).resize((tw, th), resample=resample), dtype=np.uint8)
        sx, sy = tw / cw, th / ch
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        return ImageInfo(model_image=canvas, content_box=tuple(float(v) for v in box), original_size=(h, w))

    def prepare_images(self, images) -> tuple[torch.Tensor, list[ImageInfo]]:
        """``(pixel_values [B, 3, H, W] float32, [ImageInfo] * B)`` for one image or a list of images."""
        if not isinstance(images, list | tuple):
            images = [images]
        infos = [self.prepare_image(image) for image in images]
        pixel_values = self.image_processor(
            images=[Image.fromarray(info.model_image) for info in infos],
            do_resize=False,
            do_center_crop=False,
            return_tensors="pt",
        )["pixel_values"]
        return pixel_values, infos

    # ------------------------------------------------------------------ text
    def render_prompt(self, question: str, image: bool = True) -> str:
        """The inference prompt for ``question`` in this processor's chat template."""
        return render_prompt(question, self.chat_template, image=image, image_token=self.image_token)

    def expand_image_tokens(self, text: str) -> str:
        """Replace each ``<image>`` by M image tokens."""
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def training_example(self, conversations: list[dict], max_length: int | None = None) -> dict:
        """:func:`deco_models.conversation.render_training_example` with this processor's template, tokenizer and M."""
        return render_training_example(
            conversations,
            self.chat_template,
            self.tokenizer,
            num_image_tokens=self.num_image_tokens,
            image_token=self.image_token,
            max_length=max_length,
        )

    def __call__(self, text=None, images=None, return_tensors: str = "pt", padding=True, **tokenizer_kwargs):
        """Tokenize prompts (each ``<image>`` -> M image tokens) and preprocess images.

        ``text``: a rendered prompt or a list of them (see :meth:`render_prompt`); the number of ``<image>``
        placeholders must equal the number of images.
        """
        if text is None and images is None:
            raise ValueError("give text, images or both")
        data, infos = {}, []
        if images is not None:
            data["pixel_values"], infos = self.prepare_images(images)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(self.image_token) for t in texts)
            if placeholders != len(infos):
                raise ValueError(
                    f"{placeholders} {self.image_token!r} placeholder(s) in the text but {len(infos)} image(s): "
                    f"every image needs exactly one placeholder (use processor.render_prompt(question))"
                )
            encoded = self.tokenizer(
                [self.expand_image_tokens(t) for t in texts],
                return_tensors=return_tensors,
                padding=padding,
                **tokenizer_kwargs,
            )
            data.update(encoded)
        batch = BatchFeature(data=data, tensor_type=None)
        batch.image_info = infos
        return batch

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "num_image_tokens": self.num_image_tokens,
            "image_aspect": self.image_aspect,
            "chat_template": self.chat_template,
            "image_token": self.image_token,
        }

    def save_pretrained(self, save_directory) -> None:
        """Write tokenizer files, ``preprocessor_config.json`` and ``deco_processor_config.json``."""
        from deco_models.io import atomic_write

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(save_directory))
        self.image_processor.save_pretrained(str(save_directory))
        payload = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(save_directory / PROCESSOR_CONFIG_NAME, lambda tmp: Path(tmp).write_text(payload))

    @classmethod
    def from_pretrained(cls, path, **overrides) -> DecoProcessor:
        """Load a processor saved by :meth:`save_pretrained`; ``overrides`` replace saved settings
        (e.g. ``image_aspect="square"``). A directory without ``deco_processor_config.json`` needs at least
        ``num_image_tokens=``."""
        from transformers import AutoTokenizer

        # Hub/Auto plumbing kwargs (AutoProcessor passes _from_auto, trust_remote_code, ...): not settings.
        hub_kwargs = {"trust_remote_code", "cache_dir", "revision", "token", "local_files_only", "subfolder"}
        overrides = {k: v for k, v in overrides.items() if not k.startswith("_") and k not in hub_kwargs}
        path = Path(path)
        settings = {}
        config_file = path / PROCESSOR_CONFIG_NAME
        if config_file.is_file():
            settings = json.loads(config_file.read_text())
            settings.pop("processor_class", None)
        settings.update(overrides)
        if "num_image_tokens" not in settings:
            raise ValueError(f"{path} has no {PROCESSOR_CONFIG_NAME}; pass num_image_tokens= (the projector's M)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(load_image_processor(path), tokenizer, **settings)


def _register_auto_processor() -> None:
    # AutoProcessor.from_pretrained(deco_dir) then resolves DecoConfig -> DecoProcessor.
    try:
        from transformers import AutoProcessor

        from deco_models.configuration import DecoConfig

        AutoProcessor.register(DecoConfig, DecoProcessor, exist_ok=True)
    except Exception:  # noqa: BLE001 - registration is a convenience; direct DecoProcessor.from_pretrained works
        pass


_register_auto_processor()

__all__ = ["DecoProcessor", "ImageInfo", "load_image", "load_image_processor", "pad_to_aspect"]

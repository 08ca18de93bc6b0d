"""Occlusion: how much each target token's log-probability drops when one vision patch is blanked out.

Model-agnostic and slow (one teacher-forced forward per patch, plus one). Patch ``p`` of the patch grid is replaced
by ``baseline`` in the normalized ``pixel_values`` (default 0: the processor's mean colour), the target is forced, and
``attr[t, p] = log P(target_t | unoccluded) - log P(target_t | patch p occluded)``.

``backend="captum"`` (default when captum is installed) runs captum's ``LLMAttribution(FeatureAblation(model))``
with an :class:`~captum.attr.ImageMaskInput` whose features are the patches; ``backend="torch"`` is a plain loop
that computes the same numbers without captum.

Models that see the image as several views (tiles + thumbnail, anyres base + tiles, tiles + global image): a region
of the original image shows in several views, resized differently, so occlusion blanks **regions of the original
image** and runs the model's processor again on each occluded image (the tiling stays: the image keeps its size).
The regions are the cells of a grid over the original image, by default one cell per patch of the finest view
(:func:`occlusion_grid`; ``grid=(rows, cols)`` chooses another), filled with the processor's mean colour (shifted by
``baseline`` standard deviations). The explanation's layout is then that grid (one view named ``"occlusion
grid"`` over the whole image): ``attr[t, cell]`` is the log-probability drop of occluding that cell, and
``image_map``/``patch_map`` draw it over the original image like any other map. Single-grid models occlude their
patches in ``pixel_values`` as before (``grid`` is not an option for them).

Example:
    >>> from rgae.methods import Occlusion
    >>> Occlusion(model, processor).attribute(image, target="a cat").token_attr.shape  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from rgae.capture import explain_mode
from rgae.layout import ImageLayout, View
from rgae.methods.base import Explainer, PreparedInputs
from rgae.metrics import patch_index_map


def occlude(pixel_values: torch.Tensor, index_map: torch.Tensor, keep: torch.Tensor, baseline: float) -> torch.Tensor:
    """``pixel_values`` with the patches where ``keep == 0`` set to ``baseline``."""
    pixel_keep = keep.to(pixel_values.device)[index_map.to(pixel_values.device)].to(pixel_values.dtype)
    return pixel_values * pixel_keep + baseline * (1 - pixel_keep)


def occlusion_grid(layout: ImageLayout) -> tuple[int, int]:
    """``(rows, cols)`` of cells over the original image the size of the finest view's patches (in original-image
    pixels): the default occlusion regions of a multi-view model.

    Example:
        >>> layout = ImageLayout((24, 40), (View("tile 0,0", (4, 4), (0, 0, 20, 24)),
        ...                                View("tile 0,1", (4, 4), (20, 0, 40, 24)),
        ...                                View("thumbnail", (4, 4), (0, 0, 40, 24))), torch.arange(4))
        >>> occlusion_grid(layout)
        (4, 8)
    """
    h, w = layout.image_size
    patch_h = min((v.box[3] - v.box[1]) / v.grid[0] for v in layout.views)
    patch_w = min((v.box[2] - v.box[0]) / v.grid[1] for v in layout.views)
    return max(1, min(h, round(h / patch_h))), max(1, min(w, round(w / patch_w)))


def _make_captum_input(model_inputs: dict, index_map: torch.Tensor, n_patches: int, baseline: float):
    from captum.attr import ImageMaskInput
    from captum.attr._utils.interpretable_input import InterpretableInput

    class PatchMaskInput(ImageMaskInput):
        """An ImageMaskInput whose features are the vision patches, masked in ``pixel_values`` (no re-processing:
        the pixels stay exactly those the model saw)."""

        def __init__(self):
            InterpretableInput.__init__(self)
            self.original_model_inputs = model_inputs
            self.n_itp_features = n_patches
            self.mask = index_map
            self.mask_list = []
            self.mask_id_to_idx = {i: i for i in range(n_patches)}
            self.values = [f"patch_{i}" for i in range(n_patches)]
            self.baseline = baseline

        def to_model_input(self, perturbed_tensor=None):
            if perturbed_tensor is None:
                return self.original_model_inputs
            pv = occlude(self.original_model_inputs["pixel_values"], index_map, perturbed_tensor[0], baseline)
            return {**self.original_model_inputs, "pixel_values": pv}

    return PatchMaskInput()


class Occlusion(Explainer):
    """``attribute(image, target=None, prompt=None, baseline=0.0, backend="captum"|"torch", progress=False)``."""

    method = "occlusion"

    def _attribute(self, inputs: PreparedInputs, baseline: float = 0.0, backend: str | None = None,
                   progress: bool = False, grid=None, **unknown):
        if unknown:
            raise TypeError(f"unknown Occlusion options: {sorted(unknown)} (known: baseline, backend, progress, grid)")
        if backend is None:
            try:
                import captum.attr  # noqa: F401

                backend = "captum"
            except ImportError:
                backend = "torch"
        if backend not in ("captum", "torch"):
            raise ValueError(f"backend must be 'captum' or 'torch', got {backend!r}")
        ad = self.adapter
        pv = inputs.pixel_values
        if pv.ndim != 4 or not inputs.layout.is_single_grid:
            return self._regions(inputs, baseline, backend, grid, progress)
        if grid is not None:
            raise ValueError(f"grid= is for models that see several views; {type(self.model).__name__} sees one "
                             "patch grid, whose patches are occluded")
        index_map = patch_index_map(tuple(pv.shape[-2:]), ad.patch_grid)
        prompt_inputs = {
            "input_ids": inputs.input_ids[:, : inputs.prompt_len],
            "pixel_values": pv,
            **inputs.extra,
        }
        with explain_mode(self.model, require_grad=False), torch.no_grad():
            logits, offset = self.forward(inputs)
            probs = self.token_probs(logits, inputs, offset)
            if backend == "captum":
                attr = self._captum(prompt_inputs, inputs, index_map, baseline)
            else:
                attr = self._loop(inputs, logits, offset, index_map, baseline, progress)
        return self.pack(inputs, text_to_patch=attr.to(torch.float64 if pv.dtype == torch.float64 else torch.float32),
                         token_probs=probs, options={"baseline": float(baseline), "backend": backend,
                                                     "target": "log_prob drop"})

    def _captum(self, prompt_inputs, inputs, index_map, baseline):
        from captum.attr import FeatureAblation, LLMAttribution

        n = self.adapter.n_patches
        inp = _make_captum_input(prompt_inputs, index_map, n, baseline)
        llm_attr = LLMAttribution(FeatureAblation(self.model), self._captum_tokenizer(), attr_target="log_prob")
        result = llm_attr.attribute(inp, target=inputs.target_ids.cpu(), forward_in_tokens=False)
        return result.token_attr.detach().cpu()

    def _captum_tokenizer(self):
        from rgae.methods.base import tokenizer_of

        return tokenizer_of(self.processor)

    def _loop(self, inputs, logits, offset, index_map, baseline, progress):
        keep_n = logits.shape[1]
        base = self._logprobs(logits, inputs, offset)
        n = self.adapter.n_patches
        cols = []
        for p in tqdm(range(n), desc="occlusion", disable=not progress, leave=False):
            keep = torch.ones(n)
            keep[p] = 0
            kwargs = inputs.model_kwargs()
            kwargs["pixel_values"] = occlude(inputs.pixel_values, index_map, keep, baseline)
            occluded = self.model(**kwargs, use_cache=False, logits_to_keep=keep_n).logits
            cols.append(base - self._logprobs(occluded, inputs, offset))
        return torch.stack(cols, dim=1).cpu()

    # ---- several views: regions of the original image, processed again ------------------------------------------
    def _fill_color(self, baseline: float) -> tuple[int, int, int]:
        """The RGB colour whose normalized pixels are ``baseline`` (0: the processor's mean colour)."""
        ip = getattr(self.processor, "image_processor", self.processor)

        def setting(name, default):
            value = getattr(ip, name, None)
            return np.broadcast_to(np.asarray(default if value is None else value, dtype=np.float64), (3,))

        mean, std = setting("image_mean", 0.5), setting("image_std", 0.5)
        if not getattr(ip, "do_normalize", True):
            mean, std = np.full(3, 0.0), np.full(3, 1.0)
        scale = float(getattr(ip, "rescale_factor", None) or 1 / 255)
        return tuple(int(v) for v in np.clip(np.rint((mean + baseline * std) / scale), 0, 255))

    def _regions(self, inputs: PreparedInputs, baseline: float, backend: str, grid, progress: bool):
        from PIL import Image

        layout = inputs.layout
        h, w = layout.image_size
        if grid is None:
            grid = occlusion_grid(layout)
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(g, int) and 1 <= g <= n for g, n in zip(grid, (h, w)))):
            raise ValueError(f"grid must be (rows, cols) of at least 1 and at most the image's {h}×{w} pixels, "
                             f"got {grid!r}")
        cells = ImageLayout(layout.image_size, (View("occlusion grid", tuple(grid), (0, 0, w, h)),), layout.positions,
                            None, layout.placeholder, "occlusion", None)
        index_map = patch_index_map((h, w), tuple(grid))
        fill = self._fill_color(baseline)
        prompt_len = inputs.prompt_len

        def occluded_inputs(image) -> PreparedInputs:
            batch, kwargs = self.process(image, inputs.prompt)
            if not torch.equal(batch["input_ids"].to(inputs.input_ids.device), inputs.input_ids[:, :prompt_len]):
                raise ValueError("the occluded image changed the prompt's image tokens; occlusion needs the same "
                                 "tiling for every occluded image")
            return dataclasses.replace(inputs, pixel_values=kwargs.pop("pixel_values"), extra=kwargs)

        with explain_mode(self.model, require_grad=False), torch.no_grad():
            logits, offset = self.forward(inputs)
            probs = self.token_probs(logits, inputs, offset)
            if backend == "captum":
                attr = self._captum_regions(inputs, occluded_inputs, index_map, fill)
            else:
                base = self._logprobs(logits, inputs, offset)
                cols = []
                for c in tqdm(range(math.prod(grid)), desc="occlusion", disable=not progress, leave=False):
                    image = inputs.image.copy()
                    image[(index_map == c).numpy()] = fill
                    occluded = occluded_inputs(Image.fromarray(image))
                    occluded_logits, occluded_offset = self.forward(occluded)
                    cols.append(base - self._logprobs(occluded_logits, occluded, occluded_offset))
                attr = torch.stack(cols, dim=1).cpu()
        dtype = torch.float64 if inputs.pixel_values.dtype == torch.float64 else torch.float32
        return self.pack(dataclasses.replace(inputs, layout=cells), text_to_patch=attr.to(dtype), token_probs=probs,
                         options={"baseline": float(baseline), "backend": backend, "target": "log_prob drop",
                                  "regions": f"{grid[0]}×{grid[1]} grid over the original image",
                                  "fill_rgb": list(fill)})

    @staticmethod
    def _logprobs(logits, inputs: PreparedInputs, offset: int) -> torch.Tensor:
        rows = logits[0, inputs.predicting_positions - offset]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32)).log_softmax(-1)
        return rows.gather(-1, inputs.target_ids.view(-1, 1)).squeeze(-1)

    def _captum_regions(self, inputs, occluded_inputs, index_map, fill):
        from captum.attr import FeatureAblation, ImageMaskInput, LLMAttribution
        from PIL import Image

        prompt_ids = inputs.input_ids[:, : inputs.prompt_len]

        def processor_fn(image):
            # Per-token inputs come extended over the target already: captum appends the target to input_ids only.
            kwargs = occluded_inputs(image).model_kwargs()
            kwargs.pop("attention_mask")
            return {**kwargs, "input_ids": prompt_ids}

        inp = ImageMaskInput(image=Image.fromarray(inputs.image), mask=index_map, baseline=fill,
                             processor_fn=processor_fn)
        llm_attr = LLMAttribution(FeatureAblation(self.model), self._captum_tokenizer(), attr_target="log_prob")
        result = llm_attr.attribute(inp, target=inputs.target_ids.cpu(), forward_in_tokens=False)
        return result.token_attr.detach().cpu()

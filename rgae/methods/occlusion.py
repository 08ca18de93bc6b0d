"""Occlusion: how much each target token's log-probability drops when one vision patch is blanked out.

Model-agnostic and slow (one teacher-forced forward per patch, plus one). Patch ``p`` of the patch grid is replaced
by ``baseline`` in the normalized ``pixel_values`` (default 0: the processor's mean colour), the target is forced, and
``attr[t, p] = log P(target_t | unoccluded) - log P(target_t | patch p occluded)``.

``backend="captum"`` (default when captum is installed) runs captum's ``LLMAttribution(FeatureAblation(model))``
with an :class:`~captum.attr.ImageMaskInput` whose features are the patches; ``backend="torch"`` is a plain loop
that computes the same numbers without captum.

Example:
    >>> from rgae.methods import Occlusion
    >>> Occlusion(model, processor).attribute(image, target="a cat").token_attr.shape  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rgae.capture import explain_mode
from rgae.methods.base import Explainer, PreparedInputs
from rgae.metrics import patch_index_map


def occlude(pixel_values: torch.Tensor, index_map: torch.Tensor, keep: torch.Tensor, baseline: float) -> torch.Tensor:
    """``pixel_values`` with the patches where ``keep == 0`` set to ``baseline``."""
    pixel_keep = keep.to(pixel_values.device)[index_map.to(pixel_values.device)].to(pixel_values.dtype)
    return pixel_values * pixel_keep + baseline * (1 - pixel_keep)


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
                   progress: bool = False, **unknown):
        if unknown:
            raise TypeError(f"unknown Occlusion options: {sorted(unknown)} (known: baseline, backend, progress)")
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
            raise ValueError(
                f"occlusion is not supported yet for {type(self.model).__name__}: it blanks patches of one grid in "
                f"pixel_values [1, C, H, W], but this model's are {tuple(pv.shape)} over {len(inputs.layout.views)} "
                "view(s) (tiles)"
            )
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

        def logprobs(lg):
            rows = lg[0, inputs.predicting_positions - offset].float().log_softmax(-1)
            return rows.gather(-1, inputs.target_ids.view(-1, 1)).squeeze(-1)

        base = logprobs(logits)
        n = self.adapter.n_patches
        cols = []
        for p in tqdm(range(n), desc="occlusion", disable=not progress, leave=False):
            keep = torch.ones(n)
            keep[p] = 0
            kwargs = inputs.model_kwargs()
            kwargs["pixel_values"] = occlude(inputs.pixel_values, index_map, keep, baseline)
            cols.append(base - logprobs(self.model(**kwargs, use_cache=False, logits_to_keep=keep_n).logits))
        return torch.stack(cols, dim=1).cpu()

"""Grad-CAM (Selvaraju et al., 2017) on the vision encoder's patch features at ``vision_feature_layer`` (the
projector's input), for each target token's raw logit: channel weights ``w_c`` = the gradient averaged over the
patches, map = ``ReLU(Σ_c w_c · (A_c − Ā_c))`` over the patch grid, ``Ā_c`` the channel's mean over the patches
(a kept CLS token is dropped).

Why the features are centered: Grad-CAM was made for post-ReLU CNN activations, where 0 means "feature absent". A
ViT's patch features share a large common component (in the shapes-mini vision tower the patch-mean vector carries
~92% of each patch feature's norm), and its term ``Σ_c w_c Ā_c`` is the same at every patch. Uncentered, that
constant alone set the sign of the whole map: negative, and ReLU zeroed the map; positive, and the map was positive
everywhere with the objects as dips, so min–max display drew the background hot and the objects cold (the
"inverted" look). Centering removes only that location-independent constant; the differences between patches are
Grad-CAM's own. ``center=False`` computes the uncentered original.

The channel weights average the gradient over the projector input's rows of the view — its patches and a CLS token
the projector reads (BLIP-2's Q-Former, ``vision_feature_select_strategy="full"``); the centering and the map are over
the patches only.

Models that see the image as several views (tiles, a thumbnail or global image, anyres base + tiles): every view is
one feature map of the vision tower, so each gets its own channel weights and centering
(:meth:`~rgae.adapters.ModelAdapter.connector_patch_rows` says which rows of the connector's input are which layout
patch; a CLS token belongs to the view whose patches follow it, padding tiles to none). The maps are on the layout's
patches, so ``Explanation.image_map`` draws them over the original image, every view warped to its region.

Example:
    >>> from rgae.methods import GradCAM
    >>> GradCAM(model, processor).attribute(image, target="a cat").patch_map().shape  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from rgae.adapters.base import OTHER_IMAGE_ROW
from rgae.capture import explain_mode
from rgae.methods.base import Explainer, PreparedInputs
from rgae.methods.rgae import ProjectorIO


class GradCAM(Explainer):
    """``attribute(image, target=None, prompt=None, center=True)``: per-token Grad-CAM maps ``[T, N]`` (N: the
    patches of every view)."""

    method = "gradcam"

    def _attribute(self, inputs: PreparedInputs, center: bool = True, **unknown):
        if unknown:
            raise TypeError(f"unknown GradCAM options: {sorted(unknown)} (known: max_new_tokens, center)")
        layout = inputs.layout
        io = ProjectorIO(self.adapter.projector, self.adapter.projector_input)
        with contextlib.ExitStack() as stack:
            stack.enter_context(explain_mode(self.model))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(io)
            logits, offset = self.forward(inputs)
            feats = io.input
            rows = self.adapter.connector_patch_rows(layout, inputs).to(feats.device)
            if rows.numel() == 0 or feats.numel() % rows.numel():
                raise ValueError(
                    f"Grad-CAM is not supported yet for {type(self.model).__name__}: its connector's input "
                    f"{tuple(feats.shape)} does not split into the {rows.numel()} patch rows of its "
                    f"{len(layout.views)} view(s)"
                )
            activations = feats.detach().reshape(rows.numel(), -1)  # [R, C]: one patch's features per row
            n_views = len(layout.views)
            view, weight_view = _views_of_rows(layout, rows)
            keep = view >= 0
            if center:
                activations = activations - _per_view_mean(activations, view, n_views)[view.clamp(min=0)]
            target_logits = self.target_logits(logits, inputs, offset)
            maps = []
            for t in range(target_logits.numel()):
                (grad,) = torch.autograd.grad(target_logits[t], feats, retain_graph=True, allow_unused=True)
                cam = torch.zeros(layout.n_patches, dtype=feats.dtype, device=feats.device)
                if grad is not None:
                    weights = _per_view_mean(grad.reshape(activations.shape), weight_view, n_views)
                    per_row = torch.relu((activations * weights[view.clamp(min=0)]).sum(-1))
                    cam[rows[keep]] = per_row[keep]
                maps.append(cam)
        return self.pack(inputs, text_to_patch=torch.stack(maps), token_probs=self.token_probs(logits, inputs, offset),
                         options={"layer": "vision_feature_layer", "center": bool(center),
                                  "views": "one weight vector and centering per view"})


def _views_of_rows(layout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([R], [R])``: the view of each patch row (``-1`` for rows that are no patch: the centering's), and the view
    whose channel weights each row enters: its own, and for a row that is no patch (a CLS token) the view of the
    patches after it (``-1`` when none follow: padding tiles, and for the rows of another image of the prompt)."""
    ends = torch.tensor([layout.view_slice(i).stop for i in range(len(layout.views))], device=rows.device)
    view = torch.where(rows >= 0, torch.bucketize(rows, ends, right=True), torch.full_like(rows, -1))
    patch_rows = (rows >= 0).nonzero().flatten()
    following = torch.searchsorted(patch_rows, torch.arange(rows.numel(), device=rows.device))
    has_next = (following < patch_rows.numel()) & (rows != OTHER_IMAGE_ROW)
    weight_view = torch.full_like(rows, -1)
    weight_view[has_next] = view[patch_rows[following[has_next]]]
    return view, weight_view


def _per_view_mean(values: torch.Tensor, view: torch.Tensor, n_views: int) -> torch.Tensor:
    """``[views, C]``: the mean of ``values [R, C]`` over the rows of each view (``view [R]``, -1: none)."""
    keep = view >= 0
    sums = values.new_zeros(n_views, values.shape[1]).index_add_(0, view[keep], values[keep])
    counts = torch.bincount(view[keep], minlength=n_views).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]

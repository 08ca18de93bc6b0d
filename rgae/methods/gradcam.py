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

Example:
    >>> from rgae.methods import GradCAM
    >>> GradCAM(model, processor).attribute(image, target="a cat").patch_map().shape  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from rgae.capture import explain_mode
from rgae.methods.base import Explainer, PreparedInputs
from rgae.methods.rgae import ProjectorIO


class GradCAM(Explainer):
    """``attribute(image, target=None, prompt=None, center=True)``: per-token Grad-CAM maps ``[T, N]``."""

    method = "gradcam"

    def _attribute(self, inputs: PreparedInputs, center: bool = True, **unknown):
        if unknown:
            raise TypeError(f"unknown GradCAM options: {sorted(unknown)} (known: max_new_tokens, center)")
        io = ProjectorIO(self.adapter.projector, self.adapter.projector_input)
        with contextlib.ExitStack() as stack:
            stack.enter_context(explain_mode(self.model))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(io)
            logits, offset = self.forward(inputs)
            feats = io.input
            if feats.ndim != 3 or not inputs.layout.is_single_grid:
                raise ValueError(
                    f"Grad-CAM is not supported yet for {type(self.model).__name__}: it maps one patch grid from "
                    f"projector input [1, tokens, channels], but this model's is {tuple(feats.shape)} over "
                    f"{len(inputs.layout.views)} view(s) (tiles)"
                )
            activations = feats[0].detach()
            if center:
                activations = activations - activations[self.adapter.feature_prefix :].mean(0, keepdim=True)
            target_logits = self.target_logits(logits, inputs, offset)
            maps = []
            for t in range(target_logits.numel()):
                (grad,) = torch.autograd.grad(target_logits[t], feats, retain_graph=True, allow_unused=True)
                if grad is None:
                    maps.append(torch.zeros(feats.shape[1], dtype=feats.dtype, device=feats.device))
                    continue
                weights = grad[0].mean(0)  # [C]: gradient averaged over the patch grid
                maps.append(torch.relu(activations @ weights))
        t2p = torch.stack(maps)[:, self.adapter.feature_prefix :]
        return self.pack(inputs, text_to_patch=t2p, token_probs=self.token_probs(logits, inputs, offset),
                         options={"layer": "vision_feature_layer", "center": bool(center)})

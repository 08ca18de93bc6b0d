"""Honeybee's locality-enhanced projectors (Cha et al., "Honeybee: Locality-enhanced Projector for Multimodal LLM",
CVPR 2024), reimplemented in pure PyTorch (no timm, no custom CUDA).

- ``cabstractor_{M}``: positional embedding, ``depth`` RegNet bottleneck blocks (1×1 conv, 3×3 depthwise conv,
  squeeze-excitation, 1×1 conv, residual; LayerNorm2d, SiLU), adaptive average pooling to √M×√M, ``depth`` more
  blocks, then a SiLU MLP readout. Module names follow Honeybee's timm-based ``CAbstractor`` (``pos_emb``,
  ``net.0.b1.conv1.conv.weight``, ``net.0.b1.conv1.bn.weight``, ``net.0.b1.se.fc1``, ``net.2...``, ``readout.0``), so
  its ``abstractor.*`` weights load after stripping the prefix (DeCo's prismatic code wraps it as
  ``projector.projector.*``).
- ``dabstractor_{M}``: deformable attention (Zhu et al., Deformable DETR) of M learnable queries over the patch
  grid: queries initialised from the adaptive-average-pooled features plus a learned embedding, one reference point
  per query at the centre of its pooling cell, learned sampling offsets and per-point attention weights, bilinear
  sampling with ``F.grid_sample``; ``layers`` decoder layers (query self-attention, deformable cross-attention, FFN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deco_models.projectors.registry import Projector, ProjectorSpec, register_projector


def _check_positive(options: dict) -> None:
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"abstractor option {name} must be a positive int, got {value!r}")


def _readout(depth: int, hidden_size: int, output_size: int) -> nn.Sequential:
    # Honeybee's build_mlp: SiLU between layers (not GELU).
    layers = [nn.Linear(hidden_size, output_size)]
    for _ in range(1, depth):
        layers.append(nn.SiLU())
        layers.append(nn.Linear(output_size, output_size))
    return nn.Sequential(*layers)


class _LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] then an optional activation (timm's LayerNormAct2d)."""

    def __init__(self, channels: int, apply_act: bool = True, eps: float = 1e-5):
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class _ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = _LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class RegBottleneck(nn.Module):
    """timm's RegNet ``Bottleneck`` as Honeybee configures it: bottle ratio 1, group size 1 (depthwise 3×3),
    squeeze-excitation with ratio 0.25 of the input channels, LayerNorm2d + SiLU, 1×1 conv shortcut when the
    channel count changes, SiLU after the residual sum."""

    def __init__(self, in_chs: int, out_chs: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = _ConvNormAct(in_chs, out_chs, 1)
        self.conv2 = _ConvNormAct(out_chs, out_chs, 3, groups=out_chs)
        self.se = _SqueezeExcite(out_chs, max(1, int(round(in_chs * se_ratio))))
        self.conv3 = _ConvNormAct(out_chs, out_chs, 1, apply_act=False)
        self.downsample = _ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()
        self.act3 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(out + self.downsample(x))


class RegStage(nn.Sequential):
    """``depth`` bottlenecks named ``b1``, ``b2``, ... (timm's RegStage naming); the first changes the width."""

    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", RegBottleneck(in_chs if i == 0 else out_chs, out_chs))


class CAbstractorProjector(Projector):
    """``cabstractor_{M}``: pos-emb, RegStage, adaptive average pool to √M×√M, RegStage, SiLU-MLP readout.

    Query-to-Patch for R-GAE: gradient rule (convolutions mix neighbourhoods non-linearly; no attention to follow).

    Options: ``hidden_size`` (conv width, default the vision width, Honeybee's 1024 for CLIP-L), ``depth`` (blocks
    per stage, default 3 as in the DeCo paper), ``mlp_depth`` (readout Linear layers, default 2), ``pos_emb``
    (default True).

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("cabstractor_9", 16, 24, (5, 7), depth=1)
        >>> proj(torch.randn(2, 35, 16)).shape
        torch.Size([2, 9, 24])
    """

    kind = "cabstractor"
    query_to_patch = "gradient"

    def __init__(
        self,
        spec: ProjectorSpec,
        vision_hidden_size: int,
        llm_hidden_size: int,
        grid_hw,
        hidden_size: int | None = None,
        depth: int = 3,
        mlp_depth: int = 2,
        pos_emb: bool = True,
    ):
        super().__init__(spec, vision_hidden_size, llm_hidden_size, grid_hw)
        hidden_size = hidden_size or vision_hidden_size
        _check_positive({"hidden_size": hidden_size, "depth": depth, "mlp_depth": mlp_depth})
        self.hidden_size = hidden_size
        if pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, self.num_patches, vision_hidden_size))
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        else:
            self.pos_emb = None
        self.net = nn.Sequential(
            RegStage(depth, vision_hidden_size, hidden_size),
            nn.AdaptiveAvgPool2d(self.query_grid),
            RegStage(depth, hidden_size, hidden_size),
        )
        self.readout = _readout(mlp_depth, hidden_size, llm_hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        self._check_input(image_features)
        x = image_features if self.pos_emb is None else image_features + self.pos_emb.to(image_features.dtype)
        x = self.net(self.to_grid(x))
        return self.readout(x.flatten(2).transpose(1, 2))


def deformable_sample(
    value: torch.Tensor, grid_hw: tuple[int, int], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Single-level multi-head deformable attention core (Deformable DETR's ``ms_deform_attn_core_pytorch``).

    ``value`` [B, N, H, Dh] (N = h·w row-major), ``locations`` [B, M, H, P, 2] as (x, y) in [0, 1] (0 and 1 are the
    outer edges of the grid), ``weights`` [B, M, H, P] (softmaxed over P) -> [B, M, H·Dh]. Bilinear sampling with
    zero padding outside the grid, ``align_corners=False`` so that patch (i, j) has its centre at
    ((j + 0.5)/w, (i + 0.5)/h).
    """
    b, n, heads, dh = value.shape
    _, m, _, points, _ = locations.shape
    value = value.permute(0, 2, 3, 1).reshape(b * heads, dh, *grid_hw)
    grid = (2 * locations - 1).permute(0, 2, 1, 3, 4).reshape(b * heads, m, points, 2)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, m, points)
    out = (sampled * weights).sum(-1)  # [B·H, Dh, M]
    return out.view(b, heads * dh, m).transpose(1, 2)


class DeformableCrossAttention(nn.Module):
    """Deformable attention of queries to one feature map, initialised as in Deformable DETR: zero offset weights
    with biases spreading each head's P points in a different direction, uniform attention weights."""

    def __init__(self, hidden_size: int, num_heads: int, num_points: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"D-Abstractor hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_points = num_heads, num_points
        self.sampling_offsets = nn.Linear(hidden_size, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(hidden_size, num_heads * num_points)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((directions[:, None, :] * scale).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, queries, reference_points, features, grid_hw):
        """``queries`` [B, M, D], ``reference_points`` [M, 2] (x, y) in [0, 1], ``features`` [B, N, D]."""
        b, m, _ = queries.shape
        h, w = grid_hw
        value = self.value_proj(features).view(b, h * w, self.num_heads, -1)
        # Offsets are in patch units: divide by the grid size to move into normalized coordinates.
        offsets = self.sampling_offsets(queries).view(b, m, self.num_heads, self.num_points, 2)
        offsets = offsets / torch.tensor([w, h], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[None, :, None, None, :].to(offsets.dtype) + offsets
        weights = self.attention_weights(queries).view(b, m, self.num_heads, self.num_points).softmax(-1)
        return self.output_proj(deformable_sample(value, grid_hw, locations, weights))


class DeformableLayer(nn.Module):
    """Deformable-DETR decoder layer (post-norm): query self-attention, deformable cross-attention, FFN."""

    def __init__(self, hidden_size: int, num_heads: int, num_points: int, ffn_size: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.cross_attn = DeformableCrossAttention(hidden_size, num_heads, num_points)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, ffn_size), nn.GELU(), nn.Linear(ffn_size, hidden_size))
        self.norm3 = nn.LayerNorm(hidden_size)

    def forward(self, queries, query_pos, reference_points, features, grid_hw):
        qk = queries + query_pos
        queries = self.norm1(queries + self.self_attn(qk, qk, queries, need_weights=False)[0])
        queries = self.norm2(queries + self.cross_attn(queries + query_pos, reference_points, features, grid_hw))
        return self.norm3(queries + self.ffn(queries))


class DAbstractorProjector(Projector):
    """``dabstractor_{M}``: M queries deformably attending to the patch grid, then a SiLU-MLP readout.

    Query-to-Patch for R-GAE: gradient rule (sampling locations depend on the input; no attention matrix over
    patches exists).

    Options: ``hidden_size`` (default the vision width), ``layers`` (default 2, the DeCo paper's "two-layer
    D-Abstractor"), ``num_heads`` (default hidden_size // 32, at least 1), ``num_points`` (sampling points per head,
    default 4), ``ffn_size`` (default 4·hidden_size), ``mlp_depth`` (readout, default 2), ``pos_emb`` (default True).

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("dabstractor_16", 32, 24, (8, 6))
        >>> proj(torch.randn(2, 48, 32)).shape
        torch.Size([2, 16, 24])
    """

    kind = "dabstractor"
    query_to_patch = "gradient"

    def __init__(
        self,
        spec: ProjectorSpec,
        vision_hidden_size: int,
        llm_hidden_size: int,
        grid_hw,
        hidden_size: int | None = None,
        layers: int = 2,
        num_heads: int | None = None,
        num_points: int = 4,
        ffn_size: int | None = None,
        mlp_depth: int = 2,
        pos_emb: bool = True,
    ):
        super().__init__(spec, vision_hidden_size, llm_hidden_size, grid_hw)
        hidden_size = hidden_size or vision_hidden_size
        num_heads = num_heads or max(1, hidden_size // 32)
        ffn_size = ffn_size or 4 * hidden_size
        _check_positive(
            {"hidden_size": hidden_size, "layers": layers, "num_heads": num_heads, "num_points": num_points,
             "ffn_size": ffn_size, "mlp_depth": mlp_depth}
        )  # fmt: skip
        self.hidden_size = hidden_size
        if pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, self.num_patches, vision_hidden_size))
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        else:
            self.pos_emb = None
        self.input_proj = nn.Sequential(nn.Linear(vision_hidden_size, hidden_size), nn.LayerNorm(hidden_size))
        # A learned per-query embedding added to the pooled initialisation (also the queries' positional term).
        self.query_embed = nn.Parameter(torch.empty(1, self.num_queries, hidden_size))
        nn.init.normal_(self.query_embed, mean=0.0, std=0.02)
        self.layers = nn.ModuleList(
            DeformableLayer(hidden_size, num_heads, num_points, ffn_size) for _ in range(layers)
        )
        self.readout = _readout(mlp_depth, hidden_size, llm_hidden_size)
        qh, qw = self.query_grid
        ys = (torch.arange(qh, dtype=torch.float32) + 0.5) / qh
        xs = (torch.arange(qw, dtype=torch.float32) + 0.5) / qw
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # row-major (x, y)
        self.register_buffer("reference_points", ref, persistent=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        self._check_input(image_features)
        x = image_features if self.pos_emb is None else image_features + self.pos_emb.to(image_features.dtype)
        features = self.input_proj(x)
        pooled = F.adaptive_avg_pool2d(self.to_grid(features), self.query_grid).flatten(2).transpose(1, 2)
        query_pos = self.query_embed.expand(features.shape[0], -1, -1)
        queries = pooled + query_pos
        for layer in self.layers:
            queries = layer(queries, query_pos, self.reference_points, features, self.grid_hw)
        return self.readout(queries)


@register_projector("cabstractor_{M}")
def _build_cabstractor(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return CAbstractorProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)


@register_projector("dabstractor_{M}")
def _build_dabstractor(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return DAbstractorProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)

"""Projector spec strings, their parsing, and the registry that maps each spec form to a builder.

Spec strings are the ones used by the DeCo paper's checkpoints (``mm_projector_type``): ``linear``, ``mlp{N}x_gelu``,
``avgpool{L}_{M}``, ``maxpool{L}_{M}``, ``qformer{L}_{M}``, ``cabstractor_{M}``, ``dabstractor_{M}``, where N is the
MLP depth, L a layer count and M the number of output tokens (a perfect square, at most the patch count).

Example:
    >>> from deco_models.projectors import parse_projector_spec
    >>> parse_projector_spec("avgpool2_144")
    ProjectorSpec(spec='avgpool2_144', kind='avgpool', layers=2, num_queries=144, mlp_depth=2)
    >>> parse_projector_spec("avgpool2_144").query_grid
    (12, 12)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PROJECTOR_KINDS = ("linear", "mlp", "avgpool", "maxpool", "qformer", "cabstractor", "dabstractor")

# A number in a spec: no sign, no leading zero ("avgpool02_144" is a typo, not a spec).
_NUMBER = "[1-9][0-9]*"


@dataclass(frozen=True)
class ProjectorSpec:
    """A parsed projector spec string.

    ``layers``: the L of the spec (MLP depth for linear/MLP/pooling, Q-Former layers), or None where the spec has no
    layer count (C-/D-Abstractor: the family default is used). ``num_queries``: M for compressing projectors, None for
    ``linear``/``mlp`` (they keep one token per patch). ``mlp_depth``: number of Linear layers of the MLP readout
    (linear, mlp, avgpool, maxpool), None otherwise.
    """

    spec: str
    kind: str
    layers: int | None = None
    num_queries: int | None = None
    mlp_depth: int | None = None

    @property
    def compressing(self) -> bool:
        """True when the projector outputs a fixed number M of tokens instead of one per patch."""
        return self.num_queries is not None

    @property
    def query_grid(self) -> tuple[int, int] | None:
        """(√M, √M) for compressing projectors, None otherwise (the query grid is then the patch grid)."""
        if self.num_queries is None:
            return None
        side = math.isqrt(self.num_queries)
        return (side, side)


@dataclass(frozen=True)
class _Entry:
    pattern: str
    kind: str
    regex: re.Pattern
    builder: Callable[..., nn.Module]


# Ordered: parse_projector_spec tries entries in registration order and the error message lists them in this order.
_REGISTRY: dict[str, _Entry] = {}


def _pattern_to_regex(pattern: str) -> re.Pattern:
    """``"avgpool{L}_{M}"`` -> ``^avgpool(?P<L>[1-9][0-9]*)_(?P<M>[1-9][0-9]*)$``."""
    parts = re.split(r"\{([A-Z])\}", pattern)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>{_NUMBER})" if i % 2 else re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def register_projector(pattern: str, kind: str | None = None):
    """Decorator registering ``builder(spec: ProjectorSpec, vision_hidden_size, llm_hidden_size, grid_hw, **kw)``.

    ``pattern`` is a spec form with placeholders ``{N}`` (MLP depth), ``{L}`` (layers) and ``{M}`` (output tokens),
    e.g. ``"avgpool{L}_{M}"``; ``kind`` defaults to the pattern's leading letters.

    Example:
        >>> from deco_models.projectors import available_projectors, register_projector, unregister_projector
        >>> @register_projector("identity")
        ... def _build_identity(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kw):
        ...     ...
        >>> "identity" in available_projectors()
        True
        >>> unregister_projector("identity")
    """
    regex = _pattern_to_regex(pattern)
    kind = kind or re.match(r"[a-z]+", pattern).group(0)

    def decorator(builder):
        if pattern in _REGISTRY:
            raise ValueError(f"projector pattern {pattern!r} is already registered")
        _REGISTRY[pattern] = _Entry(pattern, kind, regex, builder)
        return builder

    return decorator


def unregister_projector(pattern: str) -> None:
    """Remove a registered pattern (for tests and plugins that replace a builder)."""
    _REGISTRY.pop(pattern, None)


def available_projectors() -> list[str]:
    """The registered spec forms, e.g. ``['linear', 'mlp{N}x_gelu', 'avgpool{L}_{M}', ...]``."""
    _ensure_builtin()
    # Built-in kinds in the paper's order, then plugins in registration order.
    order = {kind: i for i, kind in enumerate(PROJECTOR_KINDS)}
    entries = sorted(_REGISTRY.values(), key=lambda e: order.get(e.kind, len(order)))
    return [e.pattern for e in entries]


def _valid_forms() -> str:
    return ", ".join(f"'{p}'" for p in available_projectors())


def _spec_error(spec, why: str) -> ValueError:
    return ValueError(
        f"invalid projector spec {spec!r}: {why}. Valid forms: {_valid_forms()} "
        "(N = MLP depth >= 1, L = layers >= 1, M = output tokens, a perfect square <= the patch count), "
        "e.g. 'mlp2x_gelu', 'avgpool2_144', 'qformer2_144', 'cabstractor_144'."
    )


def _match(spec: str) -> tuple[_Entry, dict[str, int]]:
    if not isinstance(spec, str):
        raise _spec_error(spec, f"expected a string, got {type(spec).__name__}")
    _ensure_builtin()
    for entry in _REGISTRY.values():
        found = entry.regex.match(spec)
        if found:
            return entry, {k: int(v) for k, v in found.groupdict().items()}
    raise _spec_error(spec, "unknown or malformed")


def parse_projector_spec(spec: str, num_patches: int | None = None) -> ProjectorSpec:
    """Parse a spec string; with ``num_patches`` also check that M fits the patch grid.

    Raises ValueError (listing the valid forms) for an unknown or malformed spec, M not a perfect square, or
    M > ``num_patches``.

    Example:
        >>> parse_projector_spec("mlp2x_gelu")
        ProjectorSpec(spec='mlp2x_gelu', kind='mlp', layers=2, num_queries=None, mlp_depth=2)
        >>> parse_projector_spec("qformer2_144").layers
        2
    """
    entry, numbers = _match(spec)
    m = numbers.get("M")
    if m is not None:
        if math.isqrt(m) ** 2 != m:
            raise _spec_error(spec, f"M = {m} output tokens is not a perfect square (they form a √M×√M grid)")
        if num_patches is not None and m > num_patches:
            raise _spec_error(spec, f"M = {m} output tokens is more than the {num_patches} input patches")
    depth = numbers.get("N") or numbers.get("L")
    if entry.kind == "linear":
        depth = 1
    mlp_depth = depth if entry.kind in ("linear", "mlp", "avgpool", "maxpool") else None
    return ProjectorSpec(spec=spec, kind=entry.kind, layers=depth, num_queries=m, mlp_depth=mlp_depth)


def normalize_grid(grid_hw) -> tuple[int, int]:
    """``24`` -> ``(24, 24)``; ``(16, 24)`` stays; anything else raises ValueError."""
    if isinstance(grid_hw, bool):
        raise ValueError(f"grid_hw must be an int or an (h, w) pair of positive ints, got {grid_hw!r}")
    if isinstance(grid_hw, int):
        grid_hw = (grid_hw, grid_hw)
    try:
        h, w = (int(v) for v in grid_hw)
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw must be an int or an (h, w) pair of positive ints, got {grid_hw!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(grid_hw):
        raise ValueError(f"grid_hw must be an int or an (h, w) pair of positive ints, got {grid_hw!r}")
    return (h, w)


def build_projector(spec: str, vision_hidden_size: int, llm_hidden_size: int, grid_hw, **kwargs) -> nn.Module:
    """Build the projector for ``spec``: an nn.Module mapping [B, N, vision_hidden_size] to [B, M, llm_hidden_size].

    ``grid_hw`` is the ViT patch grid (h, w) (an int means square); patches arrive row-major, N = h·w. Extra keyword
    options go to the family's constructor (e.g. ``width=``, ``num_heads=``, ``cross_attention_frequency=`` for the
    Q-Former). Every projector has ``spec``, ``kind``, ``grid_hw``, ``query_grid`` and ``num_queries``.

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("avgpool2_144", 32, 64, (24, 24))
        >>> proj(torch.randn(2, 576, 32)).shape, proj.num_queries, proj.query_grid
        (torch.Size([2, 144, 64]), 144, (12, 12))
    """
    grid = normalize_grid(grid_hw)
    for name, value in (("vision_hidden_size", vision_hidden_size), ("llm_hidden_size", llm_hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    parsed = parse_projector_spec(spec, num_patches=grid[0] * grid[1])
    entry, _ = _match(spec)
    return entry.builder(parsed, vision_hidden_size, llm_hidden_size, grid, **kwargs)


class Projector(nn.Module):
    """Base of every projector: the attributes the model, the processor and the explainers read.

    ``query_to_patch`` names the Query-to-Patch rule R-GAE uses for this projector: ``"identity"``, ``"pooling"``
    (the pooling operator itself), ``"qformer_gae"`` (GAE through the Q-Former's attention) or ``"gradient"``.
    """

    kind: str = ""
    query_to_patch: str = ""

    def __init__(self, spec: ProjectorSpec, vision_hidden_size: int, llm_hidden_size: int, grid_hw, query_grid=None):
        super().__init__()
        self.spec = spec.spec
        self.parsed_spec = spec
        self.grid_hw = normalize_grid(grid_hw)
        self.query_grid = tuple(query_grid) if query_grid is not None else (spec.query_grid or self.grid_hw)
        self.num_queries = self.query_grid[0] * self.query_grid[1]
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.vision_hidden_size = vision_hidden_size
        self.llm_hidden_size = llm_hidden_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.num_patches or x.shape[2] != self.vision_hidden_size:
            raise ValueError(
                f"{type(self).__name__} ({self.spec!r}) expects [batch, {self.num_patches} patches "
                f"(grid {self.grid_hw[0]}x{self.grid_hw[1]}, row-major), {self.vision_hidden_size}], "
                f"got {tuple(x.shape)}"
            )

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] row-major patches -> [B, D, h, w] with the real (h, w) grid (never int(sqrt(N)))."""
        b, _, d = x.shape
        return x.transpose(1, 2).reshape(b, d, *self.grid_hw)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, grid_hw={self.grid_hw}, query_grid={self.query_grid}"


_BUILTIN_LOADED = False


def _ensure_builtin() -> None:
    """Import the family modules so their @register_projector decorators have run (and in a fixed order)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    _BUILTIN_LOADED = True


_BUILTIN_MODULES = (
    "deco_models.projectors.mlp",
    "deco_models.projectors.pooling",
    "deco_models.projectors.qformer",
    "deco_models.projectors.abstractor",
)

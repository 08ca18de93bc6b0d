"""The result of an attribution: raw relevance tensors plus everything needed to read and reproduce them.

Maps are stored **unnormalized** (R-GAE is not scale invariant; normalizing is a display decision made in
:mod:`rgae.viz`). Shapes use T = target tokens, M = the image's LLM tokens (projector queries), N = vision patches
of all views (``layout.n_patches``; ``patch_grid[0] * patch_grid[1]`` for single-grid models), S = LLM sequence length.
:meth:`Explanation.image_map` gives any map over the original image's pixels (:mod:`rgae.layout`), whatever the
model's tiling.

Example:
    >>> import torch
    >>> from rgae import Explanation
    >>> e = Explanation(
    ...     method="rgae", target_text="a red circle", output_tokens=["a", "red", "circle"],
    ...     text_to_patch=torch.rand(3, 16), patch_grid=(4, 4))
    >>> e.seq_attr.shape, e.patch_map().shape, e.words
    (torch.Size([16]), torch.Size([4, 4]), ['a', 'red', 'circle'])
    >>> e.image_map(word="red").shape  # no image given: the patch grid at one pixel per patch
    torch.Size([4, 4])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgae.io import atomic_write
from rgae.layout import ImageLayout, View

_TENSOR_FIELDS = (
    "text_to_query",
    "query_to_patch",
    "text_to_patch",
    "token_ids",
    "token_probs",
    "input_ids",
    "pixel_values",
    "target_positions",
    "image_positions",
)

#: Query-to-Patch maps: stored sparsely when that is smaller (a structural map has a few entries per row).
_SPARSE_FIELDS = ("query_to_patch", "layout.query_to_patch")

# SentencePiece ("▁") and byte-level BPE ("Ġ") mark the start of a word on the token itself.
_WORD_START_MARKERS = ("▁", "Ġ", " ")


@dataclass
class Explanation:
    """Relevance of a target text to the image, per target token and for the whole sentence.

    Attributes:
        method: ``"rgae"``, ``"rawattn"``, ``"rollout"``, ``"gradcam"``, ``"occlusion"``, ...
        target_text: the explained text (teacher-forced target or the model's own answer).
        output_tokens: the T target tokens as strings (captum's name).
        text_to_patch: ``[T, N]`` Text-to-Patch relevance per target token (captum: ``token_attr``).
        patch_grid: ``(grid_h, grid_w)`` of the vision patches, row-major flattening (single-grid models; None when
            the model sees several views, see ``layout``).
        text_to_query: ``[T, M]`` Text-to-Query relevance (None for methods without a query stage).
        query_to_patch: ``[M, N]`` Query-to-Patch map of the projector (None when not defined).
        query_grid: ``(q_h, q_w)`` of the projector queries.
        token_ids: ``[T]`` target token ids; token_probs: ``[T]`` their teacher-forced probabilities.
        word_ids: for each target token, the index of the word it belongs to (subwords merged).
        image: ``uint8 [H, W, 3]`` the original image (before the processor resized, padded or tiled it).
        layout: the :class:`~rgae.layout.ImageLayout`: views, the image tokens' positions, the connector's
            Query-to-Patch rule and every patch's pixel box in ``image``. Without one, a single view whose patch
            grid covers ``image`` (or, with no image, one pixel per patch) is assumed.
        input_ids, pixel_values, target_positions, image_positions: reproduce the forward pass.
        prompt: the rendered prompt; projector_type: the projector spec string; model_name: free text.
        options: the method's options (JSON-serializable).
    """

    method: str
    target_text: str
    output_tokens: list[str]
    text_to_patch: torch.Tensor
    patch_grid: tuple[int, int] | None = None
    text_to_query: torch.Tensor | None = None
    query_to_patch: torch.Tensor | None = None
    query_grid: tuple[int, int] | None = None
    token_ids: torch.Tensor | None = None
    token_probs: torch.Tensor | None = None
    word_ids: list[int] | None = None
    image: np.ndarray | None = None
    layout: ImageLayout | None = None
    input_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    target_positions: torch.Tensor | None = None
    image_positions: torch.Tensor | None = None
    prompt: str | None = None
    projector_type: str | None = None
    model_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.patch_grid is None and self.layout is not None and self.layout.is_single_grid:
            self.patch_grid = self.layout.views[0].grid
        if self.patch_grid is None and self.layout is None:
            raise ValueError("an Explanation needs a patch_grid (single-grid models) or a layout")
        if self.patch_grid is not None:
            self.patch_grid = tuple(int(v) for v in self.patch_grid)
        if self.query_grid is not None:
            self.query_grid = tuple(int(v) for v in self.query_grid)
        t = len(self.output_tokens)
        n = self.n_patches
        where = f"patch_grid {self.patch_grid}" if self.layout is None else "the layout's patches"
        if self.text_to_patch.ndim != 2 or tuple(self.text_to_patch.shape) != (t, n):
            raise ValueError(
                f"text_to_patch must be [T={t}, N={n}] (T target tokens, N = {where}), "
                f"got {tuple(self.text_to_patch.shape)}"
            )
        if self.layout is not None and self.patch_grid is not None and self.layout.is_single_grid:
            if tuple(self.layout.views[0].grid) != self.patch_grid:
                raise ValueError(
                    f"patch_grid {self.patch_grid} disagrees with the layout's {self.layout.views[0].grid}"
                )
        if self.word_ids is None:
            self.word_ids = _word_ids_from_tokens(self.output_tokens)
        if len(self.word_ids) != t:
            raise ValueError(f"word_ids must have one entry per target token ({t}), got {len(self.word_ids)}")

    # ---- captum vocabulary -------------------------------------------------------------------------------
    @property
    def token_attr(self) -> torch.Tensor:
        """``[T, N]`` per-token attribution over patches (alias of ``text_to_patch``)."""
        return self.text_to_patch

    @property
    def seq_attr(self) -> torch.Tensor:
        """``[N]`` sentence-level attribution over patches (alias of ``sentence_text_to_patch``)."""
        return self.sentence_text_to_patch

    # ---- sentence and word maps --------------------------------------------------------------------------
    @property
    def sentence_text_to_patch(self) -> torch.Tensor:
        """``[N]``: the per-step maps averaged over the target tokens (the paper's sentence map)."""
        return self.text_to_patch.mean(dim=0)

    @property
    def sentence_text_to_query(self) -> torch.Tensor | None:
        """``[M]``: the per-step Text-to-Query maps averaged over the target tokens."""
        return None if self.text_to_query is None else self.text_to_query.mean(dim=0)

    @property
    def words(self) -> list[str]:
        """The target's words: subword tokens merged, markers stripped."""
        out: list[str] = []
        for tok, wid in zip(self.output_tokens, self.word_ids):
            piece = tok
            if wid >= len(out):
                out.append(piece.lstrip("".join(_WORD_START_MARKERS)))
            else:
                out[wid] += piece
        return out

    def word_tokens(self, word: int | str) -> list[int]:
        """Indices of the target tokens that make up ``word`` (its index, or its text: first match)."""
        if isinstance(word, str):
            try:
                word = self.words.index(word)
            except ValueError:
                raise KeyError(f"word {word!r} is not in the target; words are {self.words}") from None
        idx = [i for i, w in enumerate(self.word_ids) if w == word]
        if not idx:
            raise IndexError(f"word index {word} out of range (the target has {len(self.words)} words)")
        return idx

    def word_text_to_patch(self, word: int | str) -> torch.Tensor:
        """``[N]``: a word's map, the mean of its subword tokens' maps."""
        return self.patch_values(word=word)

    def word_text_to_query(self, word: int | str) -> torch.Tensor | None:
        return self.query_values(word=word)

    def _select(self, per_token: torch.Tensor, token: int | None, word: int | str | None) -> torch.Tensor:
        """One token's row, one word's mean row, or (default) the mean over all target tokens."""
        if token is not None and word is not None:
            raise ValueError("give token= or word=, not both")
        if token is not None:
            return per_token[token]
        if word is not None:
            return per_token[self.word_tokens(word)].mean(dim=0)
        return per_token.mean(dim=0)

    def patch_values(self, token: int | None = None, word: int | str | None = None) -> torch.Tensor:
        """``[N]`` Text-to-Patch relevance of one token, one word, or (default) the sentence."""
        return self._select(self.text_to_patch, token, word)

    def query_values(self, token: int | None = None, word: int | str | None = None) -> torch.Tensor | None:
        """``[M]`` Text-to-Query relevance of one token, one word, or the sentence (None without queries)."""
        return None if self.text_to_query is None else self._select(self.text_to_query, token, word)

    def patch_map(self, token: int | None = None, word: int | str | None = None) -> torch.Tensor:
        """``[grid_h, grid_w]`` Text-to-Patch map of one token, one word, or (default) the sentence (single-grid
        models; :meth:`image_map` works for every model)."""
        if self.patch_grid is None or (self.layout is not None and not self.layout.is_single_grid):
            views = ", ".join(v.name for v in self.image_layout.views)
            raise ValueError(f"this model sees the image as several views ({views}): use image_map() instead")
        return self.patch_values(token, word).reshape(self.patch_grid)

    # ---- maps over the original image --------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        """N: vision patches of all views."""
        if self.layout is not None:
            return self.layout.n_patches
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def image_layout(self) -> ImageLayout:
        """The layout, or (for explanations made without one) a single view over ``image``."""
        if self.layout is not None:
            return self.layout
        if self.image is not None:
            h, w = (int(v) for v in np.asarray(self.image).shape[:2])
        else:
            h, w = self.patch_grid
        positions = torch.arange(self.text_to_query.shape[1] if self.text_to_query is not None else 1)
        return ImageLayout((h, w), (View("image", self.patch_grid, (0, 0, w, h)),), positions)

    def image_map(self, token: int | None = None, word: int | str | None = None) -> torch.Tensor:
        """``[H, W]`` float64 Text-to-Image relevance over the **original** image's pixels for one token, one word,
        or (default) the sentence: every view's patches warped back to their regions and summed, each patch's
        relevance spread evenly over its pixel box (:meth:`rgae.layout.ImageLayout.render`; it sums to the
        relevance of the patches inside the image). Figures and metrics read this map, so boxes are given in
        original-image pixels for every model family."""
        return self.image_layout.render(self.patch_values(token, word))

    def query_image_map(self, query: int) -> torch.Tensor:
        """``[H, W]`` the Query-to-Image map of image token ``query`` (a row of ``query_to_patch``, rendered)."""
        if self.query_to_patch is None:
            raise ValueError(f"a {self.method!r} explanation has no Query-to-Patch map")
        m = self.query_to_patch.shape[0]
        if not -m <= int(query) < m:
            raise IndexError(f"query {query} out of range (the image has {m} tokens)")
        return self.image_layout.render(self.query_to_patch[int(query)])

    def query_map(self, token: int | None = None, word: int | str | None = None) -> torch.Tensor | None:
        """``[q_h, q_w]`` Text-to-Query map of one token, one word, or the sentence (None without queries)."""
        if self.text_to_query is None or self.query_grid is None:
            return None
        return self.query_values(token, word).reshape(self.query_grid)

    # ---- persistence -------------------------------------------------------------------------------------
    def to_parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(metadata, tensors)``: the JSON-serializable fields and the tensors (CPU, contiguous, never sharing
        storage) that :meth:`save` writes and :meth:`from_parts` reads back; explanation stores keep many of them
        in one file.

        The Query-to-Patch maps (the explanation's and the layout's) are stored sparsely — the flat indices and
        values of their non-zero entries — when that is smaller than the dense tensor, and the explanation's only
        once when it equals the layout's (the structural rules): a LLaVA-OneVision-sized layout's ``[M, N]`` map is
        ~7000 × 7300 mostly zeros. :meth:`from_parts` restores them exactly."""
        tensors = {}
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        if self.image is not None:
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(self.image))
        meta = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _TENSOR_FIELDS and f.name not in ("image", "layout")
        }
        if self.layout is not None:
            meta["layout"] = self.layout.to_dict()
            # Cloned: image_positions may be the same tensor, and safetensors refuses shared storage.
            tensors["layout.positions"] = self.layout.positions.clone()
            tensors["layout.placeholder"] = self.layout.placeholder.clone()
            if self.layout.query_to_patch is not None:
                tensors["layout.query_to_patch"] = self.layout.query_to_patch.detach().cpu().clone()
        meta["storage"] = _pack_maps(tensors)
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> Explanation:
        """The explanation of :meth:`to_parts`' ``(metadata, tensors)`` (neither argument is modified)."""
        meta, tensors = dict(meta), dict(tensors)
        _unpack_maps(tensors, meta.pop("storage", None))
        image = tensors.pop("image", None)
        layout_meta = meta.pop("layout", None)
        layout = None
        if layout_meta is not None:
            layout = ImageLayout.from_dict(
                layout_meta,
                tensors.pop("layout.positions"),
                tensors.pop("layout.query_to_patch", None),
                tensors.pop("layout.placeholder", None),
            )
        for key in ("patch_grid", "query_grid"):
            if meta.get(key) is not None:
                meta[key] = tuple(meta[key])
        return cls(**meta, **tensors, image=None if image is None else image.numpy(), layout=layout)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` as a folder with ``tensors.safetensors`` and ``explanation.json`` (atomic per file;
        Query-to-Patch maps stored sparsely, :meth:`to_parts`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta, tensors = self.to_parts()
        atomic_write(path / "tensors.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write(path / "explanation.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Explanation:
        """Read an explanation written by :meth:`save` (safetensors + JSON; no pickle)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, tensor_file = path / "explanation.json", path / "tensors.safetensors"
        if not meta_file.is_file() or not tensor_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a saved Explanation (expected explanation.json and tensors.safetensors)"
            )
        return cls.from_parts(json.loads(meta_file.read_text()), load_file(str(tensor_file)))

    # ---- display -----------------------------------------------------------------------------------------
    def plot(self, kind: str = "decomposition", **kwargs):
        """A matplotlib Figure of this explanation; ``kind`` is one of :func:`rgae.viz.plot` kinds."""
        from rgae import viz

        return viz.plot(self, kind=kind, **kwargs)

    def _repr_png_(self) -> bytes | None:
        import io

        # rgae.viz builds figures without pyplot, so showing an explanation neither switches the user's backend nor
        # leaves figures registered with it.
        try:
            fig = self.plot()
        except Exception:  # a repr must never raise in a notebook
            return None
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()

    def _repr_html_(self) -> str | None:
        # The interactive explorer (rgae.viz.explore) inline in a notebook; the PNG repr stays for other front ends.
        try:
            from rgae.viz.explore import explore

            return explore(self)._repr_html_()
        except Exception:  # a repr must never raise in a notebook
            return None

    def __repr__(self) -> str:
        q = "" if self.text_to_query is None else f", queries={tuple(self.text_to_query.shape[1:])}"
        return (
            f"Explanation(method={self.method!r}, target={self.target_text!r}, tokens={len(self.output_tokens)}, "
            f"patch_grid={self.patch_grid}{q}, projector={self.projector_type!r})"
        )


def _pack_maps(tensors: dict) -> dict:
    """Replace the Query-to-Patch maps in ``tensors`` (in place) by their sparse parts where that is smaller, and the
    explanation's by a reference when it equals the layout's; returns the JSON record :func:`_unpack_maps` reads."""
    record = {"sparse": {}, "same_as_layout": []}
    own, structural = tensors.get("query_to_patch"), tensors.get("layout.query_to_patch")
    if own is not None and structural is not None and own.dtype == structural.dtype and torch.equal(own, structural):
        del tensors["query_to_patch"]
        record["same_as_layout"].append("query_to_patch")
    for name in _SPARSE_FIELDS:
        value = tensors.get(name)
        if value is None:
            continue
        flat = value.reshape(-1)
        nonzero = flat.nonzero().flatten()
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        if nonzero.numel() * (index_dtype.itemsize + value.element_size()) >= flat.numel() * value.element_size():
            continue  # dense is smaller
        del tensors[name]
        tensors[f"{name}.index"] = nonzero.to(index_dtype)
        tensors[f"{name}.values"] = flat[nonzero].contiguous()
        record["sparse"][name] = list(value.shape)
    return record


def _unpack_maps(tensors: dict, record: dict | None) -> None:
    """Undo :func:`_pack_maps` in ``tensors`` (in place); ``record`` None: a file written before sparse storage."""
    if not record:
        return
    for name, shape in record.get("sparse", {}).items():
        index, values = tensors.pop(f"{name}.index"), tensors.pop(f"{name}.values")
        dense = torch.zeros(int(np.prod(shape)), dtype=values.dtype)
        dense[index.long()] = values
        tensors[name] = dense.reshape(shape)
    for name in record.get("same_as_layout", []):
        tensors[name] = tensors["layout.query_to_patch"]  # one tensor for both, as R-GAE makes them


def _word_ids_from_tokens(tokens: list[str]) -> list[int]:
    """Group tokens into words: a token starts a new word if it carries a word-start marker (or is the first)."""
    ids, current = [], -1
    has_markers = any(t.startswith(_WORD_START_MARKERS) for t in tokens)
    for i, tok in enumerate(tokens):
        if i == 0 or not has_markers or tok.startswith(_WORD_START_MARKERS):
            current += 1
        ids.append(current)
    return ids

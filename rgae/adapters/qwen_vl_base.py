"""What the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share: dynamic resolution, merge-block order, packed
vision attention.

* **Dynamic resolution.** The image processor resizes each image (stretched, by ``smart_resize``) to multiples of
  ``patch_size · merge_size`` pixels (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL) within its pixel budget and says
  the patch grid it got in ``image_grid_thw = [t, h, w]`` (``t = 1`` for an image: its two temporal frames are the
  same picture). So one view of ``h × w`` patches covers the whole original image, and the prompt holds
  ``h·w / merge²`` ``<|image_pad|>`` tokens between ``<|vision_start|>`` and ``<|vision_end|>``.
* **Merge-block order.** The processor flattens the patches block by block (every ``merge × merge`` block, row-major
  inside and across blocks), and the merger concatenates each run of ``merge²`` consecutive patch features into one
  LLM token: token k is block k of the block grid, in raster order. The layout numbers patches row-major like every
  other family; the order of the vision sequence is read from the model's own vision position ids (the ``(row,
  col)`` of every token its rotary embedding uses, ``get_vision_position_ids`` of the modeling module) and the
  blocks from the merger's own ``forward`` run on those indices with its norm and MLP left out.
  Query-to-Patch: each token is uniform over its block (rule ``"block"``, :mod:`rgae.adapters.blocks`).
* **Packed vision attention.** All images of a call form one vision sequence that each attention module splits by
  ``cu_seqlens``, calling the attention function once per image (per window for Qwen2.5-VL) unless it runs flash
  attention's varlen kernel; the modules return no probabilities at all, even in eager mode, so ``through_vision``
  reads them from the attention-interface capture (a block-diagonal layer). :meth:`QwenVLAdapter.vision_tokens` says
  where every layout patch sits in that sequence.
* ``mm_token_type_ids`` (1 at image tokens) is required by the forward to build M-RoPE positions; the processor
  returns it and the explainer extends it with 0 (text) over the target.

Example (a 4×6 patch grid in 2×2 blocks: the first token is patches 0, 1, 6, 7 of the raster grid):
    >>> import torch
    >>> order = merge_block_order(torch.tensor([1, 4, 6]), 2)
    >>> order.view(-1, 4)[0].tolist(), order.view(-1, 4)[1].tolist()
    ([0, 1, 6, 7], [2, 3, 8, 9])
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from rgae.adapters.base import OTHER_IMAGE_ROW, ModelAdapter, leaf_attention_modules
from rgae.adapters.blocks import block_query_to_patch, blocks_from_packed, example_ids, image_layout, token_runs
from rgae.adapters.tiling import whole_image_box
from rgae.layout import View

__all__ = ["QwenVLAdapter", "image_text_processor", "merge_block_order", "qwen_vl_fields"]


def _modeling_module(vision_tower: nn.Module):
    """The modeling module of the vision tower's class: its forward's own helpers live there."""
    return sys.modules[type(vision_tower).__module__]


def merge_block_order(grid_thw: torch.Tensor, merge: int, position_ids_fn=None) -> torch.Tensor:
    """``[t·h·w]`` long: the raster index (row-major over the ``h × w`` patch grid) of every token of one image's
    vision sequence, from the vision position ids the model's rotary embedding uses (``position_ids_fn``, default
    transformers' ``get_vision_position_ids``). Frames follow each other (``t > 1``: video)."""
    if position_ids_fn is None:
        from transformers.vision_utils import get_vision_position_ids as position_ids_fn
    t, h, w = (int(v) for v in grid_thw.tolist())
    if h % merge or w % merge:
        raise ValueError(f"a {h}×{w} patch grid is not made of {merge}×{merge} merge blocks")
    rows_cols = position_ids_fn(grid_thw.view(1, 3).long(), merge)  # [t·h·w, 2]: (row, col) per token
    frame = torch.arange(t).repeat_interleave(h * w)
    return frame * h * w + rows_cols[:, 0].long() * w + rows_cols[:, 1].long()


@dataclass
class QwenVLAdapter(ModelAdapter):
    """:class:`ModelAdapter` of the Qwen-VL families (module docs): one view per image at the image's own
    resolution, 2×2 merge blocks, tokens between ``<|vision_start|>`` and ``<|vision_end|>``.

    Attributes (besides :class:`ModelAdapter`'s):
        merge_size: the merger's ``spatial_merge_size``.
        vision_start_token_id, vision_end_token_id: the tokens around each image's tokens.
    """

    merge_size: int = 2
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    # ---- the vision sequence -------------------------------------------------------------------------------------
    def grids(self, batch) -> torch.Tensor:
        """``[images, 3]`` long ``image_grid_thw`` of the processor's output."""
        grids = batch.get("image_grid_thw") if hasattr(batch, "get") else None
        if grids is None:
            raise ValueError(f"{type(self.model).__name__} needs the processor's image_grid_thw (each image's patch "
                             "grid); was the prompt built by the model's processor?")
        grids = torch.as_tensor(grids).long().reshape(-1, 3).cpu()
        if bool((grids[:, 0] != 1).any()):
            raise ValueError(f"image_grid_thw {grids.tolist()}: an image has one temporal patch (t = 1); videos are "
                             "not explained")
        return grids

    def sequence_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[h·w]``: the raster patch index of each token of one image's vision sequence (merge-block order)."""
        return merge_block_order(grid_thw, self.merge_size, _modeling_module(self.vision_tower).get_vision_position_ids)

    def token_blocks(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[h·w / merge², merge²]`` raster patch indices each LLM token of the image concatenates: the merger's
        own ``forward`` run on the sequence's patch indices (:meth:`sequence_order`), its norm and MLP left out."""
        order = self.sequence_order(grid_thw).to(torch.float64).view(-1, 1)
        packed = type(self.projector).forward(_packing_stand_in(self.projector, self.merge_size), order)
        return blocks_from_packed(packed, order.shape[0])

    # ---- the layout ----------------------------------------------------------------------------------------------
    def image_runs(self, ids: torch.Tensor, n_images: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of each image's run of image tokens in ``ids [S]``, checked to sit between
        ``<|vision_start|>`` and ``<|vision_end|>``."""
        runs = token_runs(ids == self.image_token_id)
        if len(runs) != n_images:
            raise ValueError(f"expected {n_images} run(s) of image tokens (id {self.image_token_id}), one per image, "
                             f"found {len(runs)}; was the prompt built by the model's processor?")
        for start, stop in runs:
            before = int(ids[start - 1]) if start > 0 else None
            after = int(ids[stop]) if stop < ids.numel() else None
            if (self.vision_start_token_id is not None and before != self.vision_start_token_id) or (
                    self.vision_end_token_id is not None and after != self.vision_end_token_id):
                raise ValueError(f"the image tokens at {start}..{stop - 1} are not between <|vision_start|> (id "
                                 f"{self.vision_start_token_id}) and <|vision_end|> (id {self.vision_end_token_id})")
        return runs

    def layout(self, processor, batch, image_size, image_index: int = 0):
        """The layout of image ``image_index`` of the prompt: one view of its ``h × w`` patches over the whole
        original image (the processor stretches it to whole merge blocks), its tokens in block raster order."""
        ids = example_ids(batch)
        grids = self.grids(batch)
        if not 0 <= image_index < grids.shape[0]:
            raise ValueError(f"image_index {image_index} is out of range for {grids.shape[0]} image(s)")
        runs = self.image_runs(ids, grids.shape[0])
        grid = grids[image_index]
        _, h, w = (int(v) for v in grid.tolist())
        start, stop = runs[image_index]
        rows, cols = h // self.merge_size, w // self.merge_size
        if stop - start != rows * cols:
            raise ValueError(f"image {image_index}: {stop - start} image tokens for a {h}×{w} patch grid in "
                             f"{self.merge_size}×{self.merge_size} blocks ({rows * cols} expected)")
        q2p = block_query_to_patch(self.token_blocks(grid), h * w)
        view = View("image", (h, w), whole_image_box(image_size))
        return image_layout(image_size, [view], torch.arange(start, stop), q2p, query_grid=(rows, cols))

    def image_layouts(self, processor, batch, image_sizes):
        """One layout per image of the prompt (they are packed into one vision sequence, in prompt order)."""
        n = self.grids(batch).shape[0]
        if len(image_sizes) != n:
            raise ValueError(f"{len(image_sizes)} image size(s) for the processor's {n} image grid(s)")
        return [self.layout(processor, batch, size, image_index=i) for i, size in enumerate(image_sizes)]

    def model_inputs(self, batch) -> dict[str, torch.Tensor]:
        """The processor's tensors; ``mm_token_type_ids`` (which the forward requires for M-RoPE) is made from the
        image tokens when a processor did not return it."""
        inputs = super().model_inputs(batch)
        if "mm_token_type_ids" not in inputs and "image_grid_thw" in inputs:
            inputs["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).to(torch.int32)
        return inputs

    def describe(self) -> dict:
        # The grids are per image (image_grid_thw): the fixed ones of the dataclass are one merge block.
        return {**super().describe(), "patch_grid": "per image (image_grid_thw)",
                "query_grid": "per image (image_grid_thw / merge_size)", "merge_size": self.merge_size}

    # ---- through_vision ------------------------------------------------------------------------------------------
    def image_index(self, layout, inputs) -> int:
        """Which image of the prompt ``layout`` describes (the run of image tokens its positions start)."""
        ids = inputs.input_ids[0, : inputs.prompt_len].cpu()
        grids = self.grids(inputs.extra)
        starts = [start for start, _ in self.image_runs(ids, grids.shape[0])]
        first = int(layout.positions[0])
        if first not in starts:
            raise ValueError(f"the layout's first image token (position {first}) starts no image of the prompt")
        return starts.index(first)

    def attention_order(self, grids: torch.Tensor) -> torch.Tensor:
        """``[Σ t·h·w]``: the position in the vision attention sequence of each token of the packed merge-block
        sequence (the identity; Qwen2.5-VL reorders it by window)."""
        return torch.arange(int(grids.prod(-1).sum()))

    def patch_tokens(self, layout, inputs=None) -> torch.Tensor:
        """The tower tokens ``through_vision`` composes with: :meth:`vision_tokens`."""
        return self.vision_tokens(layout, inputs)

    def connector_patch_rows(self, layout, inputs=None) -> torch.Tensor:
        """The PatchMerger reads the tower's output in the vision attention's order (merge blocks; Qwen2.5-VL:
        windows) with every image of the prompt packed: row ``r`` is the patch whose tower token ``r`` is
        (:meth:`vision_tokens`), the rows of the prompt's other images are :data:`OTHER_IMAGE_ROW`."""
        tokens = self.vision_tokens(layout, inputs)
        total = layout.n_patches if inputs is None else int(self.grids(inputs.extra).prod(-1).sum())
        rows = torch.full((total,), OTHER_IMAGE_ROW, dtype=torch.long)
        rows[tokens] = torch.arange(tokens.numel())
        return rows

    def vision_tokens(self, layout, inputs=None) -> torch.Tensor:
        """``[N]`` long: for every patch of ``layout`` (row-major), the index of its token in the vision tower's
        attention sequence: all images of the prompt packed (``inputs``, the explainer's prepared inputs, say which
        and where the layout's is; without them the layout's image is the only one), in the order the attention
        modules see them."""
        if inputs is None:
            (h, w), = (view.grid for view in layout.views)
            grids, index = torch.tensor([[1, h, w]]), 0
        else:
            grids, index = self.grids(inputs.extra), self.image_index(layout, inputs)
        offset = int(grids[:index].prod(-1).sum())
        order = self.sequence_order(grids[index])  # sequence token -> raster patch
        raster_to_sequence = torch.empty_like(order)
        raster_to_sequence[order] = torch.arange(order.numel())
        return self.attention_order(grids)[offset + raster_to_sequence]


def image_text_processor(processor_class, image_processor, tokenizer, chat_template: str | None = None):
    """A Qwen-VL processor (an instance of a subclass of ``processor_class``: ``Qwen2VLProcessor``,
    ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) built without a video processor.

    Their ``__init__`` takes one, and the Qwen video processors need torchvision, which rgae does not install
    (``AutoProcessor.from_pretrained`` fails without it). The subclass only leaves the video processor out of the
    signature ``ProcessorMixin`` reads its parts from; everything else (``__call__``, the image-token expansion,
    ``mm_token_type_ids``) is the processor's own code. Videos cannot be processed by it.

    Example (a checkpoint's parts: the PIL image processor and the tokenizer load without torchvision):
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        >>> from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
        >>> processor = image_text_processor(Qwen2VLProcessor, Qwen2VLImageProcessorPil.from_pretrained(path),
        ...                                  AutoTokenizer.from_pretrained(path))  # doctest: +SKIP
    """

    class ImageTextProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = f"{processor_class.__name__}WithoutVideo"
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    return ImageTextProcessor(image_processor, tokenizer, chat_template=chat_template)


def _packing_stand_in(merger: nn.Module, merge: int) -> SimpleNamespace:
    """The merger with one-channel features and identity layers: its ``forward`` then only packs (the reshape
    ``view(-1, merge² · channels)``). Covers Qwen2-VL's ``PatchMerger`` (``ln_q``, ``mlp``), Qwen2.5-VL's and
    Qwen3-VL's (``norm``, ``linear_fc1``, ``act_fn``, ``linear_fc2``; with or without its post-shuffle norm)."""
    identity = nn.Identity()
    return SimpleNamespace(hidden_size=merge * merge, ln_q=identity, mlp=identity, norm=identity,
                           linear_fc1=identity, act_fn=identity, linear_fc2=identity,
                           use_postshuffle_norm=getattr(merger, "use_postshuffle_norm", False))


def qwen_vl_fields(model: nn.Module, projector_type: str) -> dict:
    """The :class:`QwenVLAdapter` fields of a Qwen-VL ``...ForConditionalGeneration``: the LLM, the vision tower
    (``model.model.visual``) with its merger as the projector, their attention modules, the token ids."""
    cfg = model.config
    inner = getattr(model, "model", model)
    visual, language_model = inner.visual, inner.language_model
    vcfg = cfg.vision_config
    merge = int(vcfg.spatial_merge_size)
    depth = len(visual.blocks)
    return dict(
        model=model,
        language_model=language_model,
        vision_tower=visual,
        projector=visual.merger,
        llm_attention=leaf_attention_modules(language_model),
        vision_attention=leaf_attention_modules(visual),
        projector_kind="mlp",
        # Dynamic resolution: no fixed grid. The layout of each call has the image's own; this is one merge block.
        patch_grid=(merge, merge),
        query_grid=(1, 1),
        image_token_id=int(cfg.image_token_id),
        vision_feature_layer=depth,  # the merger reads the last block's output
        vision_prefix=0,
        feature_prefix=0,
        projector_type=projector_type,
        merge_size=merge,
        vision_start_token_id=getattr(cfg, "vision_start_token_id", None),
        vision_end_token_id=getattr(cfg, "vision_end_token_id", None),
    )

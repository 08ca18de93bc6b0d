"""Training data for deco_models: LLaVA-format conversation records (:mod:`deco_models.data.llava`)."""

from deco_models.data.llava import (
    IGNORE_INDEX,
    BadImageError,
    LengthGroupedSampler,
    LlavaCollator,
    LlavaConversationDataset,
    expand_to_square,
    length_grouped_indices,
    load_records,
    modality_length_grouped_indices,
)

__all__ = [
    "IGNORE_INDEX",
    "BadImageError",
    "LengthGroupedSampler",
    "LlavaCollator",
    "LlavaConversationDataset",
    "expand_to_square",
    "length_grouped_indices",
    "load_records",
    "modality_length_grouped_indices",
]

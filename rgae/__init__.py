"""rgae: R-GAE relevance maps for LLaVA-style multimodal LLMs.

The engine (:mod:`rgae.rules`) is pure tensor math; adapters (:mod:`rgae.adapters`) describe model families;
methods (:mod:`rgae.methods`) join the two and return an :class:`~rgae.explanation.Explanation`;
figures live in :mod:`rgae.viz`.
"""

from rgae.explanation import Explanation

__version__ = "0.1.0"

__all__ = ["Explanation", "ExplanationStore", "__version__"]


def __getattr__(name):
    # Methods import transformers; keep `import rgae` light and lazy.
    if name in {"RGAE", "RawAttention", "AttentionRollout", "GradCAM", "Occlusion"}:
        from rgae import methods

        return getattr(methods, name)
    if name == "ExplanationStore":
        from rgae.datasets.store import ExplanationStore

        return ExplanationStore
    raise AttributeError(f"module 'rgae' has no attribute {name!r}")

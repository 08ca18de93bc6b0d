"""rgae: R-GAE relevance maps for LLaVA-style multimodal LLMs.

The engine (:mod:`rgae.rules`) is pure tensor math; adapters (:mod:`rgae.adapters`) describe model families;
methods (:mod:`rgae.methods`) join the two and return an :class:`~rgae.explanation.Explanation`;
figures live in :mod:`rgae.viz`.
"""

__version__ = "0.1.0"

__all__ = ["Explanation", "ExplanationStore", "__version__"]


def __getattr__(name):
    # Explanation imports torch and the methods transformers: keep `import rgae` (and so every `rgae`/`deco` command
    # line's start, and --help) light; they are imported on first use.
    if name == "Explanation":
        from rgae.explanation import Explanation

        return Explanation
    if name in {"RGAE", "RawAttention", "AttentionRollout", "GradCAM", "Occlusion"}:
        from rgae import methods

        return getattr(methods, name)
    if name == "ExplanationStore":
        from rgae.datasets.store import ExplanationStore

        return ExplanationStore
    raise AttributeError(f"module 'rgae' has no attribute {name!r}")

"""Whole datasets: records and their readers, the sharded explanation store, the multi-process runner behind
``rgae explain-dataset``, and the evaluation behind ``rgae evaluate`` (``docs/datasets.md``).

Example:
    >>> from rgae.datasets import ExplanationStore, read_dataset
    >>> records = read_dataset("shapes:12345:40")  # doctest: +SKIP
    >>> store = ExplanationStore("runs/shapes-rgae")  # doctest: +SKIP
"""

from rgae.datasets.readers import data_file, read_dataset, read_jsonl, read_rec, readers, register_reader
from rgae.datasets.records import Box, Record, normalize_word, record_from_json, record_to_json, word_kind
from rgae.datasets.store import ExplanationStore, StoreError

__all__ = [
    "Box",
    "ExplanationStore",
    "Record",
    "StoreError",
    "data_file",
    "explain_dataset",
    "normalize_word",
    "read_dataset",
    "read_jsonl",
    "read_rec",
    "readers",
    "record_from_json",
    "record_to_json",
    "register_reader",
    "word_kind",
]


def __getattr__(name):
    # The runner imports accelerate; keep it out of `import rgae.datasets`.
    if name == "explain_dataset":
        from rgae.datasets.runner import explain_dataset

        return explain_dataset
    raise AttributeError(f"module 'rgae.datasets' has no attribute {name!r}")

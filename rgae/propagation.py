"""Multi-layer propagation (re-exported from :mod:`rgae.rules`, where the whole engine lives).

Kept as a separate import path for code that thinks of the engine as two parts: per-layer rules
(:mod:`rgae.rules`) and their multi-layer products (this module). The objects are the same.

Example:
    >>> import torch
    >>> from rgae import propagation, rules
    >>> propagation.propagate_rows is rules.propagate_rows
    True
"""

from rgae.rules import average_steps, compose, propagate, propagate_cross_stack, propagate_rows

__all__ = ["average_steps", "compose", "propagate", "propagate_cross_stack", "propagate_rows"]

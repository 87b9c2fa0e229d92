"""Let ``torch.load(weights_only=True)`` (torch's default since 2.6) read fairseq checkpoints.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load`` without
``weights_only``, so with torch >= 2.6 only allow-listed globals may appear in a checkpoint.
A fairseq training checkpoint holds, besides tensors and plain containers (which torch
allows already):

- ``argparse.Namespace``: the model configuration of argparse-based models
  (``cfg["model"]``, every ``transformer`` / ``sparse_transformer`` checkpoint).
- numpy arrays, in the saved training metrics: with ``--eval-bleu`` the meters
  ``_bleu_counts`` / ``_bleu_totals`` are ``np.array`` of int64. Unpickling an array needs
  ``numpy.core.multiarray._reconstruct`` (a plain constructor: it allocates an empty
  array that the pickle then fills), ``numpy.ndarray``, ``numpy.dtype`` and the dtype's
  class ``numpy.dtypes.Int64DType``.

Nothing that runs arbitrary code is allowed; a checkpoint containing any other global
still fails to load, and torch's message names it (add it with
``torch.serialization.add_safe_globals`` after checking it is a plain data type).
Importing the user dir calls :func:`allow_fairseq_checkpoint_globals` and
:func:`reallow_at_each_load`: torch's ``serialization.safe_globals`` context removes its globals
on exit even when they were allow-listed before it (transformers' ``Trainer`` enters one with
numpy's ``_reconstruct``, ``ndarray`` and ``dtype`` when it resumes from a checkpoint), so
the allow-list is applied again each time fairseq loads a checkpoint. Code that calls
``torch.load`` on a fairseq checkpoint itself after such a context calls
:func:`allow_fairseq_checkpoint_globals` first.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    return core.multiarray._reconstruct


def fairseq_checkpoint_globals() -> list[Any]:
    """The globals fairseq checkpoints need, in the form ``add_safe_globals`` takes.

    numpy 2 pickles ``_reconstruct`` as ``numpy._core.multiarray._reconstruct``, numpy 1
    as ``numpy.core.multiarray._reconstruct``: both names are allowed, so checkpoints
    written under either numpy load.
    """
    reconstruct = _numpy_reconstruct()
    return [
        argparse.Namespace,
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        np.dtypes.Int64DType,
    ]


def allow_fairseq_checkpoint_globals() -> None:
    """Add :func:`fairseq_checkpoint_globals` to torch's weights-only allow-list (idempotent)."""
    torch.serialization.add_safe_globals(fairseq_checkpoint_globals())


def reallow_at_each_load() -> None:
    """Make fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` re-apply the allow-list first (idempotent)."""
    from .compat import run_before_checkpoint_loads

    run_before_checkpoint_loads(allow_fairseq_checkpoint_globals)

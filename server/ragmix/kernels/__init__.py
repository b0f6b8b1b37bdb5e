"""Compiled kernels for the token loop: the RAG-Token mixture step and per-row log-probs.

`mixture_step` and `row_logprobs` are the Numba versions; `reference` holds their plain-numpy twins,
which define the results. `mixture_step` given logits on a CUDA device (anything with
`__cuda_array_interface__`) runs `mixture_cuda`'s kernels there instead. Call `warmup()` once at
server start so no request pays for JIT (the compiled code is also cached on disk next to the
sources).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ragmix.kernels import mixture, reference
from ragmix.kernels.mixture import release_scratch, row_logprobs
from ragmix.kernels.reference import StepResult

LOG = logging.getLogger(__name__)

__all__ = ["StepResult", "mixture_step", "reference", "release_scratch", "row_logprobs", "warmup"]


def mixture_step(
    logits: Any,
    log_prior: np.ndarray,
    offsets: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
    top_n: int,
) -> StepResult:
    """One RAG-Token step for all requests (see `reference.mixture_step`), on the logits' device."""
    args = (log_prior, offsets, temperature, top_k, top_p, uniform, top_n)
    if not isinstance(logits, np.ndarray) and hasattr(logits, "__cuda_array_interface__"):
        from ragmix.kernels import mixture_cuda  # numba.cuda: only imported where it is used

        return mixture_cuda.mixture_step(logits, *args)
    return mixture.mixture_step(logits, *args)


def warmup() -> float:
    """Compile (or load from the disk cache) every kernel on tiny inputs; returns seconds taken.

    `check_step_inputs` / `check_row_inputs` convert every argument to one dtype and layout, so the
    single signature compiled here is the one every later call uses: no request pays for JIT.
    """
    start = time.perf_counter()
    logits = np.zeros((3, 8), dtype=np.float32)  # rows x vocab
    log_prior = np.log(np.array([0.5, 0.5, 1.0], dtype=np.float32))  # rows
    offsets = np.array([0, 2, 3], dtype=np.int64)
    mixture_step(
        logits,
        log_prior,
        offsets,
        np.array([0.0, 1.0], dtype=np.float32),
        np.array([0, 2], dtype=np.int32),
        np.array([1.0, 0.9], dtype=np.float32),
        np.array([0.5, 0.5]),
        2,
    )
    row_logprobs(logits, np.zeros(3, dtype=np.int64))
    seconds = time.perf_counter() - start
    LOG.info("mixture kernels ready in %.1f s", seconds)
    return seconds

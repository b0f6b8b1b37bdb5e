"""Compiled kernels for the token loop: the RAG-Token mixture step and per-row log-probs.

`mixture_step` and `row_logprobs` are the Numba versions; `reference` holds their plain-numpy twins,
which define the results. Call `warmup()` once at server start so no request pays for JIT (the
compiled code is also cached on disk next to the sources).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ragmix.kernels import reference
from ragmix.kernels.mixture import mixture_step, release_scratch, row_logprobs
from ragmix.kernels.reference import StepResult

LOG = logging.getLogger(__name__)

__all__ = ["StepResult", "mixture_step", "reference", "release_scratch", "row_logprobs", "warmup"]


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

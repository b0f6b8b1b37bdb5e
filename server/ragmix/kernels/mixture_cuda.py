"""The RAG-Token mixture step as Numba CUDA kernels over logits that stay on the device.

Same results as `reference.mixture_step` (and `mixture.mixture_step`): the generator's logits are
bound to a device buffer by onnxruntime's IO binding and read here through
`__cuda_array_interface__`; what crosses to the host is O(rows + groups x top_n) numbers: the
chosen tokens, their log-probs, the K responsibilities, each row's log p_j(token) and the top-n.

Three launches per step:

1. `_row_lse`   one block per row: lse_j = log sum_v exp(l_j[v]) (max, then a float64 sum);
2. `_log_mix`   one thread per (group, token): log p_mix(v) = logsumexp_j [prior_j + l_j[v] - lse_j]
                in float64, written to a groups x V scratch on the device;
3. `_choose`    one block per group: the token (argmax, or the seeded draw), the top-n, then the
                responsibilities and row log-probs of that group's rows.

Token choice follows the reference's order exactly: log p_mix descending, ties by lower id. The
sampled path never sorts the vocabulary: every set it needs (the top_k tokens, the nucleus, the
prefix a uniform lands in) is a prefix of that order, found by bisection over the order's key
(the float64 bits of log p_mix mapped to a monotone int64, then the token id among ties), each
probe one block-wide sum. Greedy is one block-wide argmax.

Under `NUMBA_ENABLE_CUDASIM=1` the same kernels run in Numba's simulator on numpy arrays (small
blocks: each simulated thread is a Python thread); CI tests them there against the reference.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np
from numba import cuda

from ragmix.kernels.reference import StepResult, check_step_params

SIMULATED = bool(numba.config.ENABLE_CUDASIM)
THREADS = 8 if SIMULATED else 256  # per block, a power of two
MAX_TOP_N = 20
RADIX = 8  # bits of the rank a selection pass decides
BINS = 1 << RADIX
_INT64_MIN = np.int64(-(2**63))
_FLIP = np.int64(0x7FFFFFFFFFFFFFFF)
_SIGN = np.uint64(1 << 63)
_LAST = np.uint64(2**64 - 1)  # a rank after every token's: prefix (_LAST, vocab) is everything
_COUNT, _MASS = 0, 1  # what a selection sums over a prefix: tokens, or tempered probability


# ------------------------------------------------------------------ block-wide reductions


@cuda.jit(device=True, inline=True)
def _block_sum(value, buf):
    """Sum of one float64 per thread, returned to every thread of the block."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            buf[tid] += buf[tid + step]
        cuda.syncthreads()
        step //= 2
    total = buf[0]
    cuda.syncthreads()  # every thread has read buf[0] before it is written again
    return total


@cuda.jit(device=True, inline=True)
def _block_max(value, buf):
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            buf[tid] = max(buf[tid], buf[tid + step])
        cuda.syncthreads()
        step //= 2
    peak = buf[0]
    cuda.syncthreads()
    return peak


@cuda.jit(device=True, inline=True)
def _block_first(key, ident, keys, ids):
    """The (key, id) first in the order "key descending, id ascending"; id -1 = no candidate."""
    tid = cuda.threadIdx.x
    keys[tid] = key
    ids[tid] = ident
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            k2, i2 = keys[tid + step], ids[tid + step]
            if i2 >= 0 and (ids[tid] < 0 or k2 > keys[tid] or (k2 == keys[tid] and i2 < ids[tid])):
                keys[tid] = k2
                ids[tid] = i2
        cuda.syncthreads()
        step //= 2
    best_key, best_id = keys[0], ids[0]
    cuda.syncthreads()
    return best_key, best_id


# ------------------------------------------------------------------ the order over the vocabulary


@cuda.jit(device=True, inline=True)
def _key(bits):
    """float64 bits (as int64) -> int64 with the same order as the floats (-inf lowest)."""
    return bits if bits >= 0 else bits ^ _FLIP


@cuda.jit(device=True, inline=True)
def _rank(bits):
    """float64 bits -> uint64 ascending in the sampling order (log p_mix descending): the order
    is then (rank ascending, id ascending). The largest rank, _LAST, no float has."""
    return ~(numba.uint64(_key(bits)) ^ _SIGN)


@cuda.jit(device=True, inline=True)
def _in_prefix(rank, v, c, d):
    """Whether token (rank, v) comes no later than token (c, d) in the order."""
    return rank < c or (rank == c and v <= d)


@cuda.jit(device=True, inline=True)
def _weight(mode, lp, top, inv_t):
    if mode == _COUNT:
        return 1.0
    return math.exp((lp - top) * inv_t)


@cuda.jit(device=True, inline=True)
def _crosses(weight, goal, strict):
    return weight > goal if strict else weight >= goal


@cuda.jit(device=True)
def _prefix_weight(lp_row, bits_row, vocab, c, d, mode, top, inv_t, buf):
    """Total weight of the tokens in prefix (c, d) of the order."""
    total = 0.0
    for v in range(cuda.threadIdx.x, vocab, THREADS):
        if _in_prefix(_rank(bits_row[v]), v, c, d):
            total += _weight(mode, lp_row[v], top, inv_t)
    return _block_sum(total, buf)


@cuda.jit(device=True)
def _pick_bin(hist, before, goal, strict, picked, carried):
    """Thread 0: the first bin at which the running weight crosses; the weight before it."""
    if cuda.threadIdx.x == 0:
        running, chosen = before, BINS - 1
        for b in range(BINS):
            if _crosses(running + hist[b], goal, strict):
                chosen = b
                break
            running += hist[b]
        carried[0] = running
        picked[0] = chosen
    cuda.syncthreads()
    out_bin, out_before = picked[0], carried[0]
    cuda.syncthreads()
    return out_bin, out_before


@cuda.jit(device=True)
def _select(lp_row, bits_row, vocab, bc, bd, mode, top, inv_t, goal, strict, hist, picked, carried):
    """The first token (c, d) of the base prefix (bc, bd) at which the running weight in the order
    crosses `goal` (>= goal, or > goal when strict): a radix select, RADIX bits of the rank per
    pass (a histogram of the weights of the tokens still in play), then the id among ties."""
    tid = cuda.threadIdx.x
    before, rank = 0.0, numba.uint64(0)
    for p in range(64 // RADIX):
        shift = numba.uint64(64 - RADIX * (p + 1))
        for b in range(tid, BINS, THREADS):
            hist[b] = 0.0
        cuda.syncthreads()
        for v in range(tid, vocab, THREADS):
            r = _rank(bits_row[v])
            if _in_prefix(r, v, bc, bd) and (p == 0 or (r >> (shift + RADIX)) == rank):
                digit = numba.int64((r >> shift) & numba.uint64(BINS - 1))
                cuda.atomic.add(hist, digit, _weight(mode, lp_row[v], top, inv_t))
        cuda.syncthreads()
        digit, before = _pick_bin(hist, before, goal, strict, picked, carried)
        rank = (rank << numba.uint64(RADIX)) | numba.uint64(digit)
    id_bits = 0
    while (1 << id_bits) < vocab:
        id_bits += RADIX
    ident = 0
    for p in range(id_bits // RADIX):
        shift = id_bits - RADIX * (p + 1)
        for b in range(tid, BINS, THREADS):
            hist[b] = 0.0
        cuda.syncthreads()
        for v in range(tid, vocab, THREADS):
            r = _rank(bits_row[v])
            if r == rank and _in_prefix(r, v, bc, bd) and (v >> (shift + RADIX)) == ident:
                w = _weight(mode, lp_row[v], top, inv_t)
                cuda.atomic.add(hist, (v >> shift) & (BINS - 1), w)
        cuda.syncthreads()
        digit, before = _pick_bin(hist, before, goal, strict, picked, carried)
        ident = (ident << RADIX) | digit
    return rank, ident


# ------------------------------------------------------------------ the three launches


@cuda.jit
def _row_lse(logits, log_prior, lse):
    """lse[j] = log sum_v exp(logits[j, v]), in float64; rows with a -inf prior are skipped."""
    j = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, numba.float64)
    if log_prior[j] == -math.inf:  # the same branch for the whole block
        if tid == 0:
            lse[j] = 0.0
        return
    vocab = logits.shape[1]
    peak = -math.inf
    for v in range(tid, vocab, THREADS):
        peak = max(peak, numba.float64(logits[j, v]))
    peak = _block_max(peak, buf)
    total = 0.0
    for v in range(tid, vocab, THREADS):
        total += math.exp(numba.float64(logits[j, v]) - peak)
    total = _block_sum(total, buf)
    if tid == 0:
        lse[j] = peak + math.log(total)


@cuda.jit
def _log_mix(logits, log_prior, lse, offsets, lp):
    """lp[g, v] = logsumexp over group g's rows of prior_j + logits[j, v] - lse_j (float64)."""
    g = cuda.blockIdx.y
    v = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    if v >= logits.shape[1]:
        return
    r0, r1 = offsets[g], offsets[g + 1]
    peak = -math.inf
    for j in range(r0, r1):
        if log_prior[j] != -math.inf:
            peak = max(peak, numba.float64(log_prior[j]) + numba.float64(logits[j, v]) - lse[j])
    if peak == -math.inf:
        lp[g, v] = -math.inf
        return
    total = 0.0
    for j in range(r0, r1):
        if log_prior[j] != -math.inf:
            total += math.exp(
                numba.float64(log_prior[j]) + numba.float64(logits[j, v]) - lse[j] - peak
            )
    lp[g, v] = peak + math.log(total) + 0.0  # + 0.0: no -0.0, whose bits would sort below 0.0


@cuda.jit(device=True)
def _first(bits_row, vocab, kbuf, ibuf):
    """The first token in the order: the largest key, the lowest id among ties."""
    best_k, best_i = _INT64_MIN, -1
    for v in range(cuda.threadIdx.x, vocab, THREADS):  # ascending v: a thread's first maximum wins
        k = _key(bits_row[v])
        if best_i < 0 or k > best_k:
            best_k, best_i = k, v
    _, best = _block_first(best_k, best_i, kbuf, ibuf)
    return best


@cuda.jit(device=True)
def _draw(lp_row, bits_row, vocab, top, temperature, k, p, u, buf, hist, picked, carried):
    """The seeded draw: the top_k tokens, their nucleus, then the prefix the uniform lands in
    (each set a prefix (c, d) of the order)."""
    inv_t = 1.0 / temperature
    c, d = _LAST, vocab  # every token
    if 0 < k < vocab:
        c, d = _select(
            lp_row, bits_row, vocab, c, d, _COUNT, top, inv_t, k, False, hist, picked, carried
        )
    if p < 1.0:
        goal = p * _prefix_weight(lp_row, bits_row, vocab, c, d, _MASS, top, inv_t, buf)
        c, d = _select(
            lp_row, bits_row, vocab, c, d, _MASS, top, inv_t, goal, False, hist, picked, carried
        )
    mass = _prefix_weight(lp_row, bits_row, vocab, c, d, _MASS, top, inv_t, buf)
    target, strict = u * mass, True
    if target >= mass:  # rounding at the very top: the last token with mass, as the reference
        target, strict = mass, False
    _, token = _select(
        lp_row, bits_row, vocab, c, d, _MASS, top, inv_t, target, strict, hist, picked, carried
    )
    return token


@cuda.jit(device=True)
def _top_n(lp_row, bits_row, vocab, n, top_ids, top_logprobs, g, kbuf, ibuf):
    """The n first tokens of the order, one block-wide argmax after another."""
    tid = cuda.threadIdx.x
    pk, pd = _INT64_MIN, -1
    for i in range(n):
        bk, bi = _INT64_MIN, -1
        for v in range(tid, vocab, THREADS):
            k = _key(bits_row[v])
            after = i == 0 or k < pk or (k == pk and v > pd)
            if after and (bi < 0 or k > bk):
                bk, bi = k, v
        pk, pd = _block_first(bk, bi, kbuf, ibuf)
        if tid == 0:
            top_ids[g, i] = pd
            top_logprobs[g, i] = lp_row[pd] if pd >= 0 else -math.inf


@cuda.jit
def _choose(
    logits, log_prior, lse, offsets, lp, bits, temperature, top_k, top_p, uniform, top_n,
    token, logprob, responsibility, row_logprob, top_ids, top_logprobs,
):  # fmt: skip
    """One block per group: its token, top-n, and its rows' responsibilities and log-probs."""
    g = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, numba.float64)
    kbuf = cuda.shared.array(THREADS, numba.int64)
    ibuf = cuda.shared.array(THREADS, numba.int64)
    vocab = lp.shape[1]
    lp_row, bits_row = lp[g], bits[g]
    hist = cuda.shared.array(BINS, numba.float64)
    picked = cuda.shared.array(1, numba.int64)
    carried = cuda.shared.array(1, numba.float64)
    chosen = _first(bits_row, vocab, kbuf, ibuf)
    if temperature[g] > 0:
        chosen = _draw(
            lp_row, bits_row, vocab, lp_row[chosen], numba.float64(temperature[g]),
            numba.float64(top_k[g]), numba.float64(top_p[g]), uniform[g],
            buf, hist, picked, carried,
        )  # fmt: skip
    _top_n(lp_row, bits_row, vocab, top_n, top_ids, top_logprobs, g, kbuf, ibuf)
    lp_tok = lp_row[chosen]
    if tid == 0:
        token[g] = chosen
        logprob[g] = lp_tok
    for j in range(offsets[g] + tid, offsets[g + 1], THREADS):
        if log_prior[j] == -math.inf:
            responsibility[j] = 0.0
            row_logprob[j] = -math.inf
        else:
            own = numba.float64(logits[j, chosen]) - lse[j]
            row_logprob[j] = own
            responsibility[j] = math.exp(numba.float64(log_prior[j]) + own - lp_tok)


# ------------------------------------------------------------------ host side


class _Scratch:
    """Device buffers reused across steps (grown, never shrunk): lse per row, log p_mix per group."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._buffers: dict[str, Any] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = cuda.device_array(max(size, 1), dtype)
            self._buffers[name] = buf
        return buf[:size].reshape(shape)


_SCRATCH = _Scratch()


def as_device(logits: Any) -> Any:
    """A device view of `logits` (anything with __cuda_array_interface__, no copy), or a copy to
    the device of a host array (tests, and logits that were computed on the host)."""
    if isinstance(logits, np.ndarray | list | tuple):
        return cuda.to_device(np.ascontiguousarray(logits, dtype=np.float32))
    if SIMULATED:  # the simulator's device arrays wrap numpy arrays and have no interface
        return logits
    if not hasattr(logits, "__cuda_array_interface__"):
        raise ValueError(f"logits must be a device array or a numpy array, got {type(logits)}.")
    return cuda.as_cuda_array(logits)


def _check_logits(logits: Any) -> tuple[int, int]:
    if len(logits.shape) != 2 or logits.dtype != np.float32:
        raise ValueError(
            f"logits must be float32 [rows, vocab] on the device, got {logits.dtype} "
            f"{tuple(logits.shape)}."
        )
    if not logits.is_c_contiguous():
        raise ValueError("logits on the device must be C-contiguous.")
    n_rows, vocab = logits.shape
    if vocab < 1:
        raise ValueError("logits must have a vocabulary of at least 1 token, got 0.")
    return n_rows, vocab


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
    """One RAG-Token step on the device (arguments and results as `reference.mixture_step`;
    `logits` a device array, or a host array copied over)."""
    logits = as_device(logits)
    n_rows, vocab = _check_logits(logits)
    log_prior, offsets, temperature, top_k, top_p, uniform, top_n = check_step_params(
        n_rows, vocab, log_prior, offsets, temperature, top_k, top_p, uniform, top_n
    )
    n_groups = offsets.shape[0] - 1
    small = [cuda.to_device(a) for a in (log_prior, offsets, temperature, top_k, top_p, uniform)]
    d_prior, d_offsets, d_temp, d_top_k, d_top_p, d_uniform = small
    token = cuda.device_array(n_groups, np.int64)
    logprob = cuda.device_array(n_groups, np.float32)
    responsibility = cuda.device_array(n_rows, np.float32)
    row_logprob = cuda.device_array(n_rows, np.float64)
    top_ids = cuda.device_array((n_groups, max(top_n, 1)), np.int64)
    top_logprobs = cuda.device_array((n_groups, max(top_n, 1)), np.float32)
    with _SCRATCH.lock:
        lse = _SCRATCH.get("lse", (n_rows,), np.float64)
        lp = _SCRATCH.get("lp", (n_groups, vocab), np.float64)
        bits = lp.view(np.int64)
        _row_lse[n_rows, THREADS](logits, d_prior, lse)
        _log_mix[((vocab + THREADS - 1) // THREADS, n_groups), THREADS](
            logits, d_prior, lse, d_offsets, lp
        )
        _choose[n_groups, THREADS](
            logits, d_prior, lse, d_offsets, lp, bits, d_temp, d_top_k, d_top_p, d_uniform,
            top_n, token, logprob, responsibility, row_logprob, top_ids, top_logprobs,
        )  # fmt: skip
        out = [a.copy_to_host() for a in (token, logprob, responsibility, row_logprob)]
        tops = [a.copy_to_host()[:, :top_n] for a in (top_ids, top_logprobs)]
    return StepResult(out[0], out[1], out[2], tops[0], tops[1], out[3])


def available() -> bool:
    """Whether a CUDA device (or the simulator) can run these kernels here."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install raises instead of answering
        return False

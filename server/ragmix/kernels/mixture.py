"""The RAG-Token mixture step as one compiled Numba kernel (twin of `reference.py`, same results).

Speed design (docs/DESIGN.md § Performance model): the cost is the K x V exponentials, so each logit gets exactly
one, in the probability domain,

    p_mix(v) ∝ sum_j pi_j exp(l_j[v] - m_j) / S_j,   pi_j = exp(log_prior_j - max_j log_prior_j),

with the vectorisable `fexp32`. The vocabulary is cut into chunks and the work into (request, chunk)
tasks, so one long request uses every core as well as many short ones:

1. per task and row: chunk max m_jc, e = exp(l - m_jc) into a scratch row, chunk sum S_jc;
2. per row: the log-normaliser lse_j = m_j + log sum_c S_jc exp(m_jc - m_j);
3. per task: p_mix on the chunk with weights pi_j exp(m_jc - lse_j), and the chunk's best tokens;
4. per request: merge the chunks' best tokens, sample if asked, then every returned log-prob, the
   responsibilities and each row's log p_j(token) = l_j[token] - lse_j in log space from lse_j
   (exact, whatever float32 did to p_mix).

A probability below `TINY` has lost its relative precision in float32; where a result depends on
one (top_n in a very peaked mixture, sampling over tokens with huge logit gaps), that step switches
to the exact log-space formula for the whole vocabulary. Ordinary LM logits never get there.
"""

from __future__ import annotations

import logging
import threading

import numba
import numpy as np
from numba import njit, prange

from ragmix.kernels.fastexp import FASTMATH, fexp32, flog32
from ragmix.kernels.reference import StepResult, check_row_inputs, check_step_inputs

LOG = logging.getLogger(__name__)

CHUNK = 2048  # vocabulary entries per task: small enough for L1/L2, big enough to amortise a task
_BLOCK = 256  # float32 partial sums over this many entries, then float64: accurate and vectorised
# Threads only pay for big steps: each parallel region is a fork/join, and on a machine whose cores
# are also busy elsewhere a 2-thread step measured 10-40x slower than 1 thread (benchmarks/kernels.py).
MIN_LOGITS_PER_THREAD = 1 << 20
TINY = np.float32(1e-30)  # below this a float32 mixture probability is not trusted
_NEG_INF = np.float32(-np.inf)

_JIT = {"fastmath": FASTMATH, "error_model": "numpy", "cache": True}


@njit(**_JIT)
def _exp_chunk(row, v0, v1, out):
    """max of row[v0:v1] and sum of exp(row - max), storing each exp in out. One exp per entry."""
    peak = _NEG_INF
    for v in range(v0, v1):
        peak = max(peak, row[v])
    if peak == _NEG_INF:  # the chunk is fully masked
        return peak, 0.0
    total = 0.0
    for b0 in range(v0, v1, _BLOCK):
        partial = np.float32(0.0)
        for v in range(b0, min(b0 + _BLOCK, v1)):
            e = fexp32(row[v] - peak)
            out[v] = e
            partial += e
        total += partial
    return peak, total


@njit(**_JIT)
def _row_lse(row):
    """log sum exp of a row, one vectorised exp per entry, nothing stored."""
    peak = _NEG_INF
    for v in range(row.shape[0]):
        peak = max(peak, row[v])
    total = 0.0
    for b0 in range(0, row.shape[0], _BLOCK):
        partial = np.float32(0.0)
        for v in range(b0, min(b0 + _BLOCK, row.shape[0])):
            partial += fexp32(row[v] - peak)
        total += partial
    return peak + np.log(total)


@njit(**_JIT)
def _insert_top(values, v0, v1, n, out_val, out_id):
    """The n largest of values[v0:v1] into out_*, descending, ties by lower index; pads id -1."""
    for i in range(n):
        out_val[i] = -np.inf
        out_id[i] = -1
    count = 0
    for v in range(v0, v1):
        x = values[v]
        if count < n or x > out_val[n - 1]:
            i = min(count, n - 1)
            while i > 0 and out_val[i - 1] < x:  # equal values keep the earlier (lower) id first
                out_val[i] = out_val[i - 1]
                out_id[i] = out_id[i - 1]
                i -= 1
            out_val[i] = x
            out_id[i] = v
            count = min(count + 1, n)


@njit(**_JIT)
def _argmax(values, v0, v1):
    """Index of the first maximum of values[v0:v1]: a vectorised max, then a scan for it."""
    peak = values[v0]
    for v in range(v0, v1):
        peak = max(peak, values[v])
    for v in range(v0, v1):
        if values[v] == peak:
            return v
    return v0


@njit(inline="always", **_JIT)
def _joint(logits, log_prior, lse, j, v):
    """log p_eta(z_j|x) + log_softmax(l_j)[v] in float64 (float32 would lose 1e-3 at |l| ~ 1e4)."""
    return np.float64(log_prior[j]) + np.float64(logits[j, v]) - lse[j]


@njit(**_JIT)
def _log_mix(logits, log_prior, lse, r0, r1, v):
    """Exact log p_mix(v) = logsumexp_j(log_prior_j + l_j[v] - lse_j) in float64."""
    peak = -np.inf
    for j in range(r0, r1):
        if log_prior[j] > -np.inf:
            peak = max(peak, _joint(logits, log_prior, lse, j, v))
    if peak == -np.inf:
        return peak
    total = 0.0
    for j in range(r0, r1):
        if log_prior[j] > -np.inf:
            total += np.exp(_joint(logits, log_prior, lse, j, v) - peak)
    return peak + np.log(total)


@njit(**_JIT)
def _exact_log_mix_all(logits, log_prior, lse, r0, r1, out):
    """log p_mix for the whole vocabulary, exactly (scalar exps): the rare fallback."""
    for v in range(out.shape[0]):
        out[v] = _log_mix(logits, log_prior, lse, r0, r1, v)


@njit(**_JIT)
def _before(log_p, a, b):
    """Draw order: a comes before b if its log-prob is larger, or equal with a lower id."""
    return log_p[a] > log_p[b] or (log_p[a] == log_p[b] and a < b)


@njit(**_JIT)
def _sorted_desc(log_p, ids):
    """ids in draw order (bottom-up merge sort; hand-written because Numba's sorts and
    np.partition add tens of seconds of compile time)."""
    n = ids.shape[0]
    src = ids.copy()
    dst = np.empty_like(ids)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            a, b, k = lo, mid, lo
            while a < mid and b < hi:
                if _before(log_p, src[b], src[a]):
                    dst[k] = src[b]
                    b += 1
                else:
                    dst[k] = src[a]
                    a += 1
                k += 1
            while a < mid:
                dst[k] = src[a]
                a += 1
                k += 1
            while b < hi:
                dst[k] = src[b]
                b += 1
                k += 1
        src, dst = dst, src
        width *= 2
    return src


@njit(**_JIT)
def _kth_largest(values, k):
    """The k-th largest of values (k >= 1) by quickselect on a copy, O(V) expected."""
    a = values.copy()
    want = k - 1  # position in descending order
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:  # Hoare partition, descending
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            return a[want]
    return a[want]


@njit(**_JIT)
def _ids_at_least(log_p, cut):
    """Ascending ids of the tokens with log_p >= cut."""
    count = 0
    for v in range(log_p.shape[0]):
        if log_p[v] >= cut:
            count += 1
    ids = np.empty(count, dtype=np.int64)
    i = 0
    for v in range(log_p.shape[0]):
        if log_p[v] >= cut:
            ids[i] = v
            i += 1
    return ids


@njit(**_JIT)
def _draw(ids, q, n, target):
    """Inverse CDF over the first n of (ids, q) in order: the first cumulative mass above target."""
    cum = 0.0
    last = 0
    for i in range(n):
        cum += q[i]
        if q[i] > 0:
            last = i
        if cum > target:
            return ids[i]
    return ids[last]  # rounding at the very top: the last token with mass


@njit(**_JIT)
def _nucleus_size(q, n, mass_goal):
    """Length of the shortest prefix of q[:n] whose mass reaches mass_goal (n if none does)."""
    cum = 0.0
    for i in range(n):
        cum += q[i]
        if cum >= mass_goal:
            return i + 1
    return n


@njit(**_JIT)
def _sample(log_p, q_buf, temperature, top_k, top_p, uniform):
    """Draw a token from the tempered, top_k/top_p-filtered mixture (reference.py for the rules).

    log_p: float32 log p_mix over the vocabulary; q_buf: float32 scratch of the same size.
    """
    vocab = log_p.shape[0]
    inv_t = np.float32(1.0) / temperature
    peak = _NEG_INF
    for v in range(vocab):
        peak = max(peak, log_p[v])
    if 0 < top_k < vocab:
        kth = _kth_largest(log_p, top_k)
        ids = _sorted_desc(log_p, _ids_at_least(log_p, kth))[:top_k]
        q = np.empty(top_k, dtype=np.float64)
        for i in range(top_k):
            q[i] = fexp32((log_p[ids[i]] - peak) * inv_t)
        n = top_k
        if top_p < 1.0:
            n = _nucleus_size(q, top_k, top_p * q.sum())
        return _draw(ids, q, n, uniform * q[:n].sum())
    # All tokens kept: the tempered mass Z in one vectorised pass, then sort only the head of the
    # distribution, widening it until its mass covers what the nucleus or the draw needs.
    total = 0.0
    for b0 in range(0, vocab, _BLOCK):
        partial = np.float32(0.0)
        for v in range(b0, min(b0 + _BLOCK, vocab)):
            e = fexp32((log_p[v] - peak) * inv_t)
            q_buf[v] = e
            partial += e
        total += partial
    goal = top_p * total if top_p < 1.0 else uniform * total
    width = np.float32(16.0)  # tempered nats below the peak
    while True:
        cut = peak - width * temperature if width < 100.0 else _NEG_INF  # beyond 100: q underflows
        ids = _sorted_desc(log_p, _ids_at_least(log_p, cut))
        q = np.empty(ids.shape[0], dtype=np.float64)
        for i in range(ids.shape[0]):
            q[i] = q_buf[ids[i]]
        if cut == _NEG_INF or q.sum() > goal:
            break
        width *= np.float32(4.0)
    n = ids.shape[0]
    if top_p < 1.0:
        n = _nucleus_size(q, n, goal)
        return _draw(ids, q, n, uniform * q[:n].sum())
    return _draw(ids, q, n, goal)


@njit(**_JIT)
def _finish_group(
    g, logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n,
    lse, prior_peak, cand_p, cand_id, work, p_mix,
    token, logprob, responsibility, top_ids, top_logprobs, row_logprob,
):  # fmt: skip
    """Step 4 for request g: merge the chunks' best tokens, choose, report in log space.

    A separate (serial) function: inside the parallel kernel's body it would multiply compile time.
    """
    vocab = logits.shape[1]
    n_chunks = cand_p.shape[0] // (offsets.shape[0] - 1)
    n_sel = cand_p.shape[1]
    r0 = offsets[g]
    r1 = offsets[g + 1]
    merged = cand_p[g * n_chunks : (g + 1) * n_chunks].ravel()
    merged_id = cand_id[g * n_chunks : (g + 1) * n_chunks].ravel()
    best_p = np.empty(n_sel, dtype=np.float32)
    best_slot = np.empty(n_sel, dtype=np.int64)
    _insert_top(merged, 0, merged.shape[0], n_sel, best_p, best_slot)
    log_p = work[r0]  # this row's exps are spent; reuse it for log p_mix
    exact = False
    if temperature[g] == 0:
        tok = merged_id[best_slot[0]]
    else:
        mix = p_mix[g]
        shift = prior_peak[g]
        for v in range(vocab):  # vectorised log; entries below TINY are redone exactly
            log_p[v] = flog32(max(mix[v], TINY)) + shift
        for v in range(vocab):
            if mix[v] < TINY:
                log_p[v] = _log_mix(logits, log_prior, lse, r0, r1, v)
        exact = True
        tok = _sample(log_p, mix, temperature[g], top_k[g], top_p[g], uniform[g])
    token[g] = tok

    # log p_mix(token), the responsibilities and log p_j(token), exactly, from the row
    # log-normalisers (rows with a -inf prior have no lse_j: they keep r_j = 0, row_logprob = -inf).
    lp_tok = _log_mix(logits, log_prior, lse, r0, r1, tok)
    logprob[g] = lp_tok
    for j in range(r0, r1):
        if log_prior[j] > -np.inf:
            responsibility[j] = np.exp(_joint(logits, log_prior, lse, j, tok) - lp_tok)
            row_logprob[j] = np.float64(logits[j, tok]) - lse[j]

    if top_n > 0:
        if best_p[top_n - 1] >= TINY:  # float32 order is trustworthy
            for i in range(top_n):
                top_ids[g, i] = merged_id[best_slot[i]]
        else:
            if not exact:  # (sampling already made log_p exact where it mattered)
                _exact_log_mix_all(logits, log_prior, lse, r0, r1, log_p)
            chosen_lp = np.empty(top_n, dtype=np.float32)
            _insert_top(log_p, 0, vocab, top_n, chosen_lp, top_ids[g])
        for i in range(top_n):
            if top_ids[g, i] >= 0:
                top_logprobs[g, i] = _log_mix(logits, log_prior, lse, r0, r1, top_ids[g, i])


@njit(parallel=True, **_JIT)
def _mixture_step(
    logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n, chunk, work, p_mix
):
    """All requests' mixture step; work [R, V] and p_mix [G, V] are float32 scratch."""
    n_rows, vocab = logits.shape
    n_groups = offsets.shape[0] - 1
    n_chunks = (vocab + chunk - 1) // chunk
    n_tasks = n_groups * n_chunks
    n_sel = max(top_n, 1)

    # 1. chunk maxima and sums of exp, one exp per logit.
    chunk_max = np.empty((n_rows, n_chunks), dtype=np.float32)  # rows x chunks
    chunk_sum = np.zeros((n_rows, n_chunks), dtype=np.float64)  # rows x chunks
    for t in prange(n_tasks):
        g = t // n_chunks
        c = t - g * n_chunks
        v0 = c * chunk
        v1 = min(v0 + chunk, vocab)
        for j in range(offsets[g], offsets[g + 1]):
            if log_prior[j] == -np.inf:  # a passage with no prior mass costs nothing
                chunk_max[j, c] = _NEG_INF
                continue
            peak, total = _exp_chunk(logits[j], v0, v1, work[j])
            chunk_max[j, c] = peak
            chunk_sum[j, c] = total

    # 2. row log-normalisers lse_j (log softmax(l_j)[v] = l_j[v] - lse_j) and group prior peaks.
    # (Serial: rows x chunks scalar work is too small for another fork/join, which costs the most
    # when other processes hold the cores.)
    lse = np.zeros(n_rows, dtype=np.float64)  # rows
    for j in range(n_rows):
        if log_prior[j] == -np.inf:
            continue
        peak = _NEG_INF
        for c in range(n_chunks):
            peak = max(peak, chunk_max[j, c])
        total = 0.0
        for c in range(n_chunks):
            if chunk_max[j, c] > _NEG_INF:
                total += chunk_sum[j, c] * np.exp(np.float64(chunk_max[j, c]) - peak)
        lse[j] = peak + np.log(total)
    prior_peak = np.empty(n_groups, dtype=np.float64)  # groups
    for g in range(n_groups):
        best = -np.inf
        for j in range(offsets[g], offsets[g + 1]):
            best = max(best, np.float64(log_prior[j]))
        prior_peak[g] = best

    # 3. p_mix (scaled by exp(-prior_peak)) per chunk, and each chunk's best tokens.
    cand_p = np.empty((n_tasks, n_sel), dtype=np.float32)  # tasks x selected
    cand_id = np.empty((n_tasks, n_sel), dtype=np.int64)  # tasks x selected
    for t in prange(n_tasks):
        g = t // n_chunks
        c = t - g * n_chunks
        v0 = c * chunk
        v1 = min(v0 + chunk, vocab)
        mix = p_mix[g]
        for v in range(v0, v1):
            mix[v] = 0.0
        for j in range(offsets[g], offsets[g + 1]):
            if log_prior[j] == -np.inf or chunk_max[j, c] == _NEG_INF:
                continue
            w = np.float32(
                np.exp(log_prior[j] - prior_peak[g] + np.float64(chunk_max[j, c]) - lse[j])
            )
            e = work[j]
            for v in range(v0, v1):
                mix[v] += w * e[v]
        if n_sel == 1:
            best = _argmax(mix, v0, v1)
            cand_p[t, 0] = mix[best]
            cand_id[t, 0] = best
        else:
            _insert_top(mix, v0, v1, n_sel, cand_p[t], cand_id[t])

    # 4. per request: merge, choose, and report in log space.
    token = np.empty(n_groups, dtype=np.int64)
    logprob = np.empty(n_groups, dtype=np.float32)
    responsibility = np.zeros(n_rows, dtype=np.float32)
    top_ids = np.full((n_groups, top_n), -1, dtype=np.int64)
    top_logprobs = np.full((n_groups, top_n), -np.inf, dtype=np.float32)
    row_logprob = np.full(n_rows, -np.inf, dtype=np.float64)
    # Greedy requests need only O(K) scalar work here: run them serially unless some request
    # samples (O(V) work each), so a greedy step has just the two parallel regions above.
    if np.any(temperature > 0):
        for g in prange(n_groups):
            _finish_group(
                g, logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n,
                lse, prior_peak, cand_p, cand_id, work, p_mix,
                token, logprob, responsibility, top_ids, top_logprobs, row_logprob,
            )  # fmt: skip
    else:
        for g in range(n_groups):
            _finish_group(
                g, logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n,
                lse, prior_peak, cand_p, cand_id, work, p_mix,
                token, logprob, responsibility, top_ids, top_logprobs, row_logprob,
            )  # fmt: skip
    return token, logprob, responsibility, top_ids, top_logprobs, row_logprob


@njit(parallel=True, **_JIT)
def _row_logprobs(logits, targets):
    out = np.empty(logits.shape[0], dtype=np.float32)  # rows
    for n in prange(logits.shape[0]):
        out[n] = logits[n, targets[n]] - _row_lse(logits[n])
    return out


class _Scratch:
    """Grow-only float32 buffers reused across steps: a fresh 50 MB array per step would spend
    milliseconds in page faults. The lock also serialises kernel calls (the workqueue threading
    layer is not re-entrant)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        size = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < size:
            buf = np.empty(size, dtype=np.float32)
            self._buffers[name] = buf
        return buf[:size].reshape(shape)

    def release(self) -> None:
        with self.lock:
            self._buffers.clear()


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the scratch buffers (they grow to the largest step seen: rows x vocab x 4 bytes)."""
    _SCRATCH.release()


_MAX_THREADS: int | None = None


def set_max_threads(threads: int | None) -> None:
    """Cap the kernels' threads (None: Numba's pool size, NUMBA_NUM_THREADS)."""
    global _MAX_THREADS
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}.")
    _MAX_THREADS = threads


def kernel_threads(n_logits: int) -> int:
    """Threads for a step over n_logits logits: one per MIN_LOGITS_PER_THREAD, within the cap."""
    cap = numba.config.NUMBA_NUM_THREADS if _MAX_THREADS is None else _MAX_THREADS
    return max(1, min(cap, numba.config.NUMBA_NUM_THREADS, n_logits // MIN_LOGITS_PER_THREAD))


class _numba_threads:
    """Run a block with this many Numba threads (a thread-local setting), then restore it."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.previous = numba.get_num_threads()
        numba.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        numba.set_num_threads(self.previous)


def mixture_step(
    logits: np.ndarray,
    log_prior: np.ndarray,
    offsets: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
    top_n: int,
) -> StepResult:
    """One RAG-Token step for all requests (arguments and results as `reference.mixture_step`)."""
    logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n = check_step_inputs(
        logits, log_prior, offsets, temperature, top_k, top_p, uniform, top_n
    )
    n_rows, vocab = logits.shape
    n_groups = offsets.shape[0] - 1
    threads = kernel_threads(n_rows * vocab)
    with _SCRATCH.lock, _numba_threads(threads):
        work = _SCRATCH.get("work", (n_rows, vocab))  # rows x vocab
        p_mix = _SCRATCH.get("p_mix", (n_groups, vocab))  # groups x vocab
        out = _mixture_step(
            logits,
            log_prior,
            offsets,
            temperature,
            top_k,
            top_p,
            uniform,
            top_n,
            CHUNK,
            work,
            p_mix,
        )
    return StepResult(*out)


def row_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[n, targets[n]] for every row n, float32 [N] (Score, RAG-Sequence)."""
    logits, targets = check_row_inputs(logits, targets)
    with _numba_threads(kernel_threads(logits.size)):
        return _row_logprobs(logits, targets)

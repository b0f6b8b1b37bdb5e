"""The decode path that binds the cache and the logits by pointer (IO binding: in place on the
CPU here, in device memory on a GPU) against plain `InferenceSession.run` with numpy feeds and
fetched outputs: the same greedy tokens, step for step, and the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from ragmix.engine import kv
from ragmix.engine.rows import RunningBatch
from ragmix.models import arrays
from ragmix.models.generator import Generator

STEPS = 12


@pytest.fixture(scope="module")
def gen(tiny_generator_dir) -> Generator:
    return Generator.load(tiny_generator_dir, threads=1)


def prompts(gen: Generator) -> list[list[int]]:
    ids = gen.encode("Paris is the capital of France. The quick brown fox jumps over the dog.")
    return [ids[:9], ids[2:6], ids[5:16]]


def run_unbound(gen: Generator, rows: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy decoding with session.run: every input fed, every output fetched (copies both ways),
    one row at a time so no padding is involved; the present KV becomes the next past."""
    tokens, logits_seen = [[] for _ in rows], [[] for _ in rows]
    names = gen.input_names
    for r, prompt in enumerate(rows):
        shape = (1, gen.num_kv_heads, 0, gen.head_dim)
        past = [np.zeros(shape, np.float32) for _ in range(2 * gen.num_layers)]
        feed_ids, length = np.array([prompt], np.int64), 0
        for _ in range(STEPS):
            new = feed_ids.shape[1]
            feeds = {
                names[0]: feed_ids,
                names[1]: np.array([length + new - 1], np.int32),
                names[2]: np.array(length + new, np.int32),
                names[3]: np.array([[new - 1]], np.int64),
            }
            feeds.update(zip(names[4:], past, strict=True))
            out = gen.session.run(None, feeds)
            logits, past = out[0][0, 0], out[1:]
            token = int(np.argmax(logits))
            tokens[r].append(token)
            logits_seen[r].append(logits)
            length += new
            past = [p[:, :, :length] for p in past]
            feed_ids = np.array([[token]], np.int64)
    return tokens, [np.stack(x) for x in logits_seen]


def run_bound(gen: Generator, rows: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy decoding the engine's way: a prefill pass, then the running batch's in-place decode
    over buffers from `device_cache` (bound by pointer, logits too)."""
    first, batch = kv.prefill(gen, rows)
    running = RunningBatch(gen, max_rows=len(rows))
    pieces = [[kv.row_kv(batch, r)] for r in range(len(rows))]
    tokens = [[int(np.argmax(first[r]))] for r in range(len(rows))]
    seen = [[first[r]] for r in range(len(rows))]
    running.add(pieces, [t[0] for t in tokens])
    for _ in range(STEPS - 1):
        logits = arrays.to_host(running.decode(gen))
        running.append()
        for r in range(len(rows)):
            tokens[r].append(int(np.argmax(logits[r])))
            seen[r].append(logits[r])
        running.last[:] = [t[-1] for t in tokens]
    return tokens, [np.stack(x) for x in seen]


def test_io_bound_decode_equals_session_run_token_for_token(gen) -> None:
    rows = prompts(gen)
    want_tokens, want_logits = run_unbound(gen, rows)
    got_tokens, got_logits = run_bound(gen, rows)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len({tuple(t) for t in got_tokens}) > 1  # the rows really decode differently


def test_device_cache_is_bound_in_place_on_this_device(gen) -> None:
    """On the CPU the device cache is numpy; a decode writes the new slot into it (no copy)."""
    assert gen.device_kind == "cpu"
    cache = gen.device_cache(2, 8)
    assert all(isinstance(a, np.ndarray) and not a.any() for a in cache)
    logits = gen.forward(
        np.array([[1], [2]]), np.zeros(2, np.int64), np.zeros((2, 1), np.int64), cache
    )
    assert isinstance(logits, np.ndarray) and logits.shape == (2, 1, gen.vocab_size)
    assert all(a[:, :, 0].any() and not a[:, :, 1:].any() for a in cache)
    assert arrays.location(cache[0]) == ("cpu", 0, cache[0].ctypes.data)


def test_host_arrays_are_not_copied_by_to_host() -> None:
    before = arrays.host_copies()
    a = np.ones(3)
    assert arrays.to_host(a) is a
    assert arrays.host_copies() == before

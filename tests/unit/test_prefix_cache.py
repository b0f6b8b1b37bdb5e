"""The passage prefix cache is exact: cached and uncached prefill give the same logits and answers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import make_engine

from ragmix.engine import kv
from ragmix.engine.outputs import TokenEvent
from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams
from ragmix.engine.prefix_cache import PassageCache, prefix_key
from ragmix.engine.prompts import PromptTemplate, passage_text, tokenize_prompt
from ragmix.models.generator import Generator

PASSAGES = [
    ("yield", "The yield statement is only used when defining a generator function."),
    ("for", "The for statement is used to iterate over the elements of a sequence."),
    ("import", "The basic import statement finds a module, loading and initializing it."),
]
QUESTIONS = ["What does yield do?", "How do loops work?"]


@pytest.fixture(scope="module")
def gen(tiny_generator_dir):
    return Generator.load(tiny_generator_dir, threads=1)


def prompts_for(gen, question):
    tpl = PromptTemplate.parse(gen.prompt_template)
    return [tokenize_prompt(tpl, gen.encode, passage_text(t, x), question) for t, x in PASSAGES]


def cached_pass(gen, rows, prefixes):
    """Rows continuing from prefixes (None: computed whole): logits after each row's last token."""
    pieces = [[] if p is None else [p] for p in prefixes]
    out = kv.run_rows(gen, rows, pieces, [[len(r) - 1] for r in rows])
    return out.logits[:, 0], out


def test_cached_prefix_prefill_equals_full_prefill(gen):
    for q in QUESTIONS:
        prompts = prompts_for(gen, q)
        full_logits, _ = kv.prefill(gen, [p.ids for p in prompts])
        # Prefixes computed alone (as the cache holds them), then only the rest of each prompt.
        prefixes = []
        for p in prompts:
            _, b = kv.prefill(gen, [p.passage])
            prefixes.append(kv.row_slots(b, 0, 0, len(p.passage)))
        cached_logits, out = cached_pass(gen, [p.rest for p in prompts], prefixes)
        np.testing.assert_allclose(cached_logits, full_logits, atol=1e-5, rtol=0)
        assert out.prefix_lengths == [len(p.passage) for p in prompts]
        # Mixed batch: some rows from the cache, some computed whole.
        mixed, _ = cached_pass(
            gen,
            [prompts[0].rest, prompts[1].ids, prompts[2].rest],
            [prefixes[0], None, prefixes[2]],
        )
        np.testing.assert_allclose(mixed, full_logits, atol=1e-5, rtol=0)


def test_decode_after_cached_prefill_equals_uncached(gen):
    prompts = prompts_for(gen, QUESTIONS[0])
    _, full = kv.prefill(gen, [p.ids for p in prompts])
    prefixes = []
    for p in prompts:
        _, b = kv.prefill(gen, [p.passage])
        prefixes.append(kv.row_slots(b, 0, 0, len(p.passage)))
    _, out = cached_pass(gen, [p.rest for p in prompts], prefixes)
    rows = [[prefix, out.new_slots(i, len(p.rest))] for i, (prefix, p) in enumerate(
        zip(prefixes, prompts, strict=True))]  # fmt: skip
    cached = kv.select(full, np.arange(full.rows))  # full's shapes, every slot overwritten:
    for batch in (cached,):
        for a in batch.past:
            a[:] = np.nan
    for i, row in enumerate(rows):
        kv.write_pieces(cached.past, i, 0, row)
    for batch in (full, cached):
        batch.last[:] = 7
    np.testing.assert_allclose(kv.decode(gen, cached), kv.decode(gen, full), atol=1e-5, rtol=0)


def test_lru_evicts_to_the_byte_budget():
    a = [np.zeros((1, 2, 10, 4), np.float32)] * 2  # 640 bytes
    cache = PassageCache(max_bytes=1500)
    keys = [prefix_key("fp", [i]) for i in range(3)]
    for k in keys[:2]:
        assert cache.put(k, [1], a)
    assert cache.get(keys[0]) is not None  # keys[0] is now most recent
    cache.put(keys[2], [1], a)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert cache.bytes == 1280 and len(cache) == 2
    assert not cache.put(prefix_key("fp", [9]), [1], [np.zeros(1000, np.float32)])
    assert prefix_key("fp", [1, 2]) != prefix_key("other", [1, 2])


def test_engine_reuses_passages_and_answers_the_same(tiny_parts):
    cold = make_engine(tiny_parts, passage_cache_bytes=0)
    warm = make_engine(tiny_parts, passage_cache_bytes=1 << 26)

    async def run(engine):
        events = [
            ev
            async for ev in engine.generate(
                RetrievalParams(QUESTIONS[0], top_k=3),
                DecodingParams(max_new_tokens=8),
                Mixture.TOKEN,
            )
        ]
        return [e.id for e in events if isinstance(e, TokenEvent)], events[-1]

    try:
        ref_ids, ref_done = asyncio.run(run(cold))
        first_ids, first = asyncio.run(run(warm))
        second_ids, second = asyncio.run(run(warm))
        assert ref_done.usage.cached_prompt_tokens == 0
        assert first.usage.cached_prompt_tokens == 0
        assert 0 < second.usage.cached_prompt_tokens < second.usage.prompt_tokens
        assert ref_ids == first_ids == second_ids
        np.testing.assert_allclose(second.posterior, ref_done.posterior, atol=1e-5)
        assert warm.passage_cache.hits == 3
    finally:
        cold.shutdown()
        warm.shutdown()

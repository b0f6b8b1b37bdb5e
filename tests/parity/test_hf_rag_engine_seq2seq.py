"""The engine serving encoder-decoder bundles, against Hugging Face's RAG models token for token.

The side under test is the real engine (retrieval over the tiny FAISS index, prompts through the
bundle's templates, encoder rows admitted by chunked prefill, the continuous batch, the Numba
mixture kernel, Score as prefill rows); the reference is transformers' RagTokenForGeneration /
RagSequenceForGeneration around the PyTorch model the bundle was exported from, given the same
context ids and, as doc scores, the log of the engine's own prior (log_softmax of which is that
prior).
"""

from __future__ import annotations

import asyncio
import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_seq2seq import LONG_QUESTION, rag_models, shortest_passage_ids, tiny_seq2seq_bundle

from ragmix.engine.prompts import PromptTemplate, passage_text, tokenize_prompt
from ragmix.models.seq2seq import Seq2SeqGenerator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUESTIONS = ["What does the yield statement do?", "How do I import a module?", "What is a class?"]
ANSWERS = ["The yield statement returns a value.", "import the module"]
KS = (1, 3, 5)
NEW_TOKENS = 8
MIN_GAP = 1e-4
ATOL = 1e-5
RTOL_F32 = 5e-7  # ~4 float32 ulps


@pytest.fixture(scope="module", params=["bart", "t5"])
def models(request, tmp_path_factory, tiny_encoder_dir, tiny_index_dir):
    """(Seq2SeqGenerator, the PyTorch model it was exported from, encoder, index) per family."""
    from ragmix.index import IndexBundle
    from ragmix.models.encoder import Encoder

    root = tmp_path_factory.mktemp(f"engine-{request.param}")
    gen = Seq2SeqGenerator.load(tiny_seq2seq_bundle(root, request.param), threads=1)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        root / f"hf-{request.param}", dtype=torch.float32
    ).eval()
    enc = Encoder.load(tiny_encoder_dir, threads=1)
    idx = IndexBundle.load(tiny_index_dir, encoder_fingerprint=enc.fingerprint)
    gen.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / f"hf-{request.param}")
    return gen, model, enc, idx


def run(models, coroutine_fn, **config):
    """Run coroutine_fn(engine) on a started in-process engine over the family's bundle."""
    from conftest import make_engine

    gen, _, enc, idx = models
    engine = make_engine((gen, enc, idx), **config)
    try:
        return asyncio.run(coroutine_fn(engine))
    finally:
        engine.shutdown()


def context(gen: Seq2SeqGenerator, passages, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K encoder inputs the engine builds (its prompt functions), as HF's padded batch."""
    template = PromptTemplate.parse(gen.prompt_template)
    rows = []
    for p in passages:
        text = passage_text(p.title, p.text, gen.passage_template)
        prompt = tokenize_prompt(template, gen.encode, text, question, gen.decoder_start_ids)
        assert prompt.ids[prompt.source :] == list(gen.decoder_start_ids)
        rows.append(prompt.ids[: prompt.source])
        # the context string HF's retriever writes, tokenised whole by the model's tokenizer
        assert rows[-1] == gen.hf_tokenizer(f"{p.title} / {p.text} // {question}").input_ids
    ids = torch.full((len(rows), max(map(len, rows))), gen.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def doc_scores(passages) -> torch.Tensor:
    return torch.log(torch.tensor([[p.prior for p in passages]], dtype=torch.float64)).float()


def passages_for(models, q: int, k: int) -> list[str]:
    """Question q's K passages: from the index's shortest, rotated by q (see shortest_passage_ids)."""
    gen, _, _, idx = models
    pool = shortest_passage_ids(gen, idx, 12)
    return [pool[(q + j) % len(pool)] for j in range(k)]


async def greedy(engine, question: str, ids: list[str], mixture_name: str = "TOKEN", **decoding):
    from ragmix.engine.outputs import DoneEvent, PassagesEvent, TokenEvent
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    params = DecodingParams(max_new_tokens=NEW_TOKENS, **decoding)
    retrieval = RetrievalParams(question, passage_ids=ids)
    events = [ev async for ev in engine.generate(retrieval, params, Mixture[mixture_name])]
    passages = next(e for e in events if isinstance(e, PassagesEvent)).passages
    done = next(e for e in events if isinstance(e, DoneEvent))
    return passages, [e for e in events if isinstance(e, TokenEvent)], done


@pytest.mark.parametrize("k", KS)
def test_engine_rag_token_greedy_equals_hf_generate(models, k):
    gen, model, _, _ = models
    token_model, _ = rag_models(model, k)

    async def ask_all(engine):
        return [
            await greedy(engine, question, passages_for(models, q, k), top_n=2)
            for q, question in enumerate(QUESTIONS)
        ]

    for question, (passages, tokens, done) in zip(QUESTIONS, run(models, ask_all), strict=True):
        assert len(passages) == k and done.usage.cached_prompt_tokens == 0
        for t in tokens:  # the marginal's top two apart: greedy cannot flip on rounding
            assert t.top[0][2] - t.top[1][2] > MIN_GAP, "greedy tie: choose another question"
        ids, mask = context(gen, passages, question)
        with torch.no_grad():
            out = token_model.generate(
                context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores(passages),
                n_docs=k, num_beams=1, do_sample=False, max_length=NEW_TOKENS + len(
                    gen.decoder_start_ids), min_length=0, no_repeat_ngram_size=0,
            )[0].tolist()  # fmt: skip
        want = out[len(gen.decoder_start_ids) :]
        want = want[: next((i + 1 for i, t in enumerate(want) if t in gen.eos_token_ids), None)]
        assert [t.id for t in tokens] == want, question


@pytest.mark.parametrize("answer", ANSWERS)
def test_engine_score_equals_hf_rag_losses(models, answer):
    from ragmix.engine.params import RetrievalParams

    gen, model, _, _ = models
    k = 3
    # float64: HF's float32 loss itself drifts ~1e-5 at tens of nats
    token_model, sequence_model = rag_models(copy.deepcopy(model).double(), k)

    async def score(engine):
        ids = passages_for(models, 0, k)
        return await engine.score(RetrievalParams(QUESTIONS[0], passage_ids=ids), answer)

    passages, result = run(models, score)
    ids, mask = context(gen, passages, QUESTIONS[0])
    assert len(result.answer_ids) >= 2  # HF's RAG-Sequence adds the prior at target position 1
    labels = torch.tensor([[*gen.decoder_start_ids, *result.answer_ids]])
    kw = dict(context_input_ids=ids, context_attention_mask=mask,
              doc_scores=doc_scores(passages).double(),
              labels=labels, n_docs=k, reduce_loss=False)  # fmt: skip
    with torch.no_grad():
        token_nll = float(token_model(**kw).loss[0])
        sequence_nll = float(sequence_model(**kw).loss[0])
    # Within 1e-5, or a few float32 ulps of the total where that is larger: the engine's
    # per-token log-probs are float32 (ONNX logits, the Numba kernel), and a random tiny T5 spends
    # 10-20 nats a token (77 nats differed by 1.4e-5, 173 by 1.1e-5, against float64 HF).
    assert result.token.logprob == pytest.approx(-token_nll, abs=ATOL, rel=RTOL_F32)
    assert result.sequence.logprob == pytest.approx(-sequence_nll, abs=ATOL, rel=RTOL_F32)
    assert result.token.logprob != pytest.approx(result.sequence.logprob, abs=1e-3)


def hf_rag_sequence(gen, model, sequence_model, ids, mask, scores, beams: int) -> list[int]:
    """RagSequenceForGeneration.generate's "thorough" decoding, written with its own pieces: the
    generator's beam search per passage (num_return_sequences = num_beams), duplicates dropped,
    every candidate rescored by the RAG-Sequence loss (exclude_bos_score), the best one. HF's
    generate runs the passages as one batch without their attention mask, so padding would leak
    into the encoder; here each passage runs alone, unpadded, as the method intends."""
    start = len(gen.decoder_start_ids)
    found: dict[tuple[int, ...], list[int]] = {}
    for j in range(ids.shape[0]):
        row = ids[j : j + 1, : int(mask[j].sum())]
        out = model.generate(
            row, attention_mask=torch.ones_like(row), num_beams=beams, num_return_sequences=beams,
            do_sample=False, max_length=NEW_TOKENS + start, min_length=0, no_repeat_ngram_size=0,
            length_penalty=1.0, early_stopping=False,
        )  # fmt: skip
        for seq in out.tolist():
            ended = [t for t in seq[start:] if t != gen.pad_token_id]
            found.setdefault(tuple(ended), seq)
    width = max(map(len, found.values()))
    labels = torch.tensor([s + [gen.pad_token_id] * (width - len(s)) for s in found.values()])
    n = labels.shape[0]
    loss = sequence_model(
        context_input_ids=ids.repeat(n, 1), context_attention_mask=mask.repeat(n, 1),
        doc_scores=scores.repeat(n, 1), labels=labels, n_docs=ids.shape[0],
        exclude_bos_score=True, reduce_loss=False,
    ).loss  # fmt: skip
    return list(list(found)[int(loss.argmin())])


@pytest.mark.parametrize("k", [1, 3])
def test_rag_sequence_thorough_equals_hf_thorough_decoding(models, k):
    gen, model, _, _ = models
    beams = 3
    _, sequence_model = rag_models(model, k)

    async def ask(engine):
        return await greedy(engine, QUESTIONS[0], passages_for(models, 0, k), "SEQUENCE",
                            num_beams=beams)  # fmt: skip

    passages, tokens, done = run(models, ask)
    ids, mask = context(gen, passages, QUESTIONS[0])
    with torch.no_grad():
        want = hf_rag_sequence(gen, model, sequence_model, ids, mask, doc_scores(passages), beams)
    assert [t.id for t in tokens] == want
    assert done.sequences[0].token_ids == want


@pytest.mark.parametrize("fast", [False, True])
def test_every_mixture_streams_an_answer_and_a_source_too_long_is_refused(models, fast):
    from ragmix.errors import ValidationError

    async def ask(engine):
        three = passages_for(models, 1, 3)
        seq = await greedy(engine, QUESTIONS[1], three, "SEQUENCE", num_beams=2,
                           fast_sequence_decoding=fast)  # fmt: skip
        concat = await greedy(engine, QUESTIONS[1], three[:2], "CONCAT")
        with pytest.raises(ValidationError, match="source positions"):
            await greedy(engine, LONG_QUESTION, three[:1], "CONCAT")
        return seq, concat

    (_, seq_tokens, seq_done), (_, concat_tokens, concat_done) = run(models, ask)
    assert seq_tokens and len(seq_done.posterior) == 3
    assert np.isclose(sum(seq_done.posterior), 1.0)
    assert concat_tokens and concat_done.posterior == []

"""Encoder-decoder bundles against Hugging Face's RAG models, at the model level (no engine).

The reference is transformers' RagTokenForGeneration / RagSequenceForGeneration around the very
PyTorch BART / T5 the bundle was exported from (DPR question encoder untouched: context ids and
doc scores are given). The side under test is Seq2SeqGenerator.forward over the unified slot
cache: K fresh rows (one per passage) in one pass, then one decoder token a pass, with the
RAG-Token mixture written out here (per passage log_softmax + log_softmax(doc_scores), logsumexp
over the K passages).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_seq2seq import BUILDERS, rag_models

from ragmix.models.seq2seq import Seq2SeqGenerator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Eiffel", "The city is known for the Eiffel Tower, the Louvre museum and the river Seine."),
    ("Berlin", "Berlin is the capital of Germany; Rome is the capital of Italy."),
    ("Fox", "The quick brown fox jumps over the lazy dog."),
    ("Retrieval", "Retrieval finds the passages that answer a question."),
    ("Text", 'A passage is a short piece of text. {Braces} and "quotes" appear in text too.'),
]
QUESTIONS = ["What is the capital of France?", "Which river?", "What does retrieval find?"]
ANSWERS = ["Paris is the capital.", "The river Seine.", "The passages that answer."]
KS = (1, 3, 5)
MAX_LENGTH = 8  # HF's max_length: the start token and 7 generated ones
MIN_GAP = 1e-4
ATOL_NLL = 1e-5


@pytest.fixture(scope="module", params=["bart", "t5"])
def models(request, tmp_path_factory):
    """(bundle, HF tokenizer, the PyTorch model it was exported from) for each family."""
    from ragmix.models.seq2seq_export import export_seq2seq

    family = request.param
    root = tmp_path_factory.mktemp(f"rag-{family}")
    src = BUILDERS[family](root / f"hf-{family}")
    gen = Seq2SeqGenerator.load(export_seq2seq(src, root / family), threads=1)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32).eval()
    return gen, transformers.AutoTokenizer.from_pretrained(src), model


def case(q: int, k: int) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Question q's K passages (rotated through the list) and raw doc scores [K]."""
    passages = [PASSAGES[(q + j) % len(PASSAGES)] for j in range(k)]
    scores = np.random.default_rng(10 * q + k).normal(0.0, 1.5, k).astype(np.float32)
    return passages, scores


def sources(gen: Seq2SeqGenerator, tokenizer, passages, question: str):
    """Each passage's encoder input, through the bundle's templates, and HF's context batch;
    the two must be the same tokens."""
    rows = []
    for title, text in passages:
        passage = gen.passage_template.replace("{title}", title).replace("{text}", text)
        rows.append(gen.encode(gen.prompt_template.format(passage=passage, question=question)))
    strings = [f"{title} / {text} // {question}" for title, text in passages]  # HF's retriever
    context = tokenizer(strings, padding=True, return_tensors="pt")
    for row, ids, mask in zip(rows, context.input_ids, context.attention_mask):
        assert row == ids[mask.bool()].tolist()
    return rows, context


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def padded(rows: list[list[int]], pad: int) -> np.ndarray:
    ids = np.full((len(rows), max(map(len, rows))), pad, np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    return ids


def rag_token_greedy(gen: Seq2SeqGenerator, rows: list[list[int]], scores: np.ndarray) -> list[int]:
    """Greedy RAG-Token over forward: the K passages' rows encoded in the first pass, then one
    decoder pass a step over the K rows; the start token first, as HF returns it."""
    k, e = len(rows), np.array([len(r) for r in rows])
    prior = log_softmax(scores)[:, None]  # K x 1
    start = gen.decoder_start_token_id
    cache = gen.new_cache(k, int(e.max()) + MAX_LENGTH)
    logits = gen.forward(
        padded([[*r, start] for r in rows], gen.pad_token_id),
        np.zeros(k, np.int64),
        e[:, None],
        cache,
        e,
    )
    out, lengths = [start], e + 1
    while True:
        marginal = logsumexp(log_softmax(logits[:, 0]) + prior, axis=0)  # V
        top2 = np.sort(marginal)[-2:]
        assert top2[1] - top2[0] > MIN_GAP, "a near tie: greedy could flip on rounding"
        token = int(marginal.argmax())
        out.append(token)
        if token in gen.eos_token_ids or len(out) == MAX_LENGTH:
            return out
        step = np.full((k, 1), token, np.int64)
        logits = gen.forward(step, lengths, np.zeros((k, 1), np.int64), cache, e)
        lengths = lengths + 1


@pytest.mark.parametrize("k", KS)
def test_rag_token_greedy_equals_hf_generate(models, k):
    gen, tokenizer, model = models
    token_model, _ = rag_models(model, k)
    outputs = []
    for q, question in enumerate(QUESTIONS):
        passages, scores = case(q, k)
        rows, context = sources(gen, tokenizer, passages, question)
        ours = rag_token_greedy(gen, rows, scores)
        with torch.no_grad():
            hf = token_model.generate(
                context_input_ids=context.input_ids,
                context_attention_mask=context.attention_mask,
                doc_scores=torch.from_numpy(scores)[None],
                n_docs=k,
                num_beams=1,
                do_sample=False,
                max_length=MAX_LENGTH,
            )
        assert ours == hf[0].tolist(), f"question {q}"
        outputs.append(tuple(ours))
    assert len(set(outputs)) > 1  # the passages and questions matter


def teacher_forced_log_probs(gen, rows: list[list[int]], labels: list[int]) -> np.ndarray:
    """log p_k(labels[t + 1] | labels[: t + 1]) for every passage k and step t: K x (T - 1)."""
    k, e = len(rows), np.array([len(r) for r in rows])
    index = e[:, None] + np.arange(len(labels) - 1)  # K x (T-1)
    cache = gen.new_cache(k, int(e.max()) + len(labels))
    ids = padded([r + labels for r in rows], gen.pad_token_id)
    logits = gen.forward(ids, np.zeros(k, np.int64), index, cache, e)
    lp = log_softmax(logits)  # K x (T-1) x V
    return np.take_along_axis(lp, np.array(labels[1:])[None, :, None], axis=2)[..., 0]


@pytest.mark.parametrize("k", KS)
def test_rag_token_and_sequence_nll_equal_hf_loss(models, k):
    """HF's losses in float64 (a copy of the model): its float32 sums of 6 log-probs of ~8 nats
    each are themselves off by up to ~1e-5; the bundle's float32 logits are held to the exact
    value."""
    gen, tokenizer, model = models
    token_model, sequence_model = rag_models(copy.deepcopy(model).double(), k)
    for q, question in enumerate(QUESTIONS):
        passages, scores = case(q, k)
        rows, context = sources(gen, tokenizer, passages, question)
        target = gen.encode(ANSWERS[q])
        assert len(target) >= 2 and gen.pad_token_id not in target  # HF masks PAD targets
        labels = [gen.decoder_start_token_id, *target]  # HF: unshifted, start id first
        lp = teacher_forced_log_probs(gen, rows, labels)  # K x T
        prior = log_softmax(scores)[:, None]
        token_nll = -logsumexp(lp + prior, axis=0).sum()
        sequence_nll = -logsumexp(lp.sum(axis=1) + prior[:, 0], axis=0)
        kw = {
            "context_input_ids": context.input_ids,
            "context_attention_mask": context.attention_mask,
            "doc_scores": torch.from_numpy(scores).double()[None],
            "labels": torch.tensor([labels]),
            "n_docs": k,
            "reduce_loss": False,
        }
        with torch.no_grad():
            hf_token = float(token_model(**kw).loss[0])
            hf_sequence = float(sequence_model(**kw).loss[0])
        assert abs(token_nll - hf_token) <= ATOL_NLL, (q, token_nll, hf_token)
        assert abs(sequence_nll - hf_sequence) <= ATOL_NLL, (q, sequence_nll, hf_sequence)
        if k > 1:  # the two mixtures differ: a lost prior or a swapped sum would show
            assert abs(token_nll - sequence_nll) > 1e-4

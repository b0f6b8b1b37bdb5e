"""ragmix's mixtures against Hugging Face's RAG code, on tiny random-weight Llama and GPT-2 models.

The reference side runs the PyTorch model the ONNX bundle was exported from, one unpadded row per
passage, and combines the passages with `RagTokenForGeneration.marginalize` from transformers (or,
for RAG-Sequence, the formula its `get_nll` implements, written out in torch). The ragmix side is
the code under test: `score_answer` (one padded batched ONNX pass) and the engine's greedy
RAG-Token loop (KV cache, continuous batching, the Numba mixture kernel).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragmix.engine.prompts import PromptTemplate
from ragmix.engine.score import passage_prompts, score_answer
from ragmix.models.generator import Generator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.rag.modeling_rag import RagTokenForGeneration  # noqa: E402

QUESTION = "What is the capital of France?"
PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France, known for the Eiffel Tower."),
    ("Berlin", "Berlin is the capital of Germany; Rome is the capital of Italy."),
    ("Fox", "The quick brown fox jumps over the lazy dog."),
]
DOC_SCORES = [2.0, 0.5, -1.0]  # raw retrieval scores; HF log_softmaxes them into the prior
ANSWERS = ["Paris is the capital of France.", "The river Seine."]
ATOL = 1e-5
MIN_GAP = 1e-4


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request, tiny_generator_dir, tmp_path_factory):
    """(ONNX generator, the PyTorch model it was exported from) for each family."""
    if request.param == "llama":  # the session bundle: tiny_generator_bundle's layout
        bundle, src = tiny_generator_dir, tiny_generator_dir.parent / "hf-llama"
    else:
        from tiny_models import tiny_generator_bundle

        root = tmp_path_factory.mktemp("parity-gpt2")
        bundle, src = tiny_generator_bundle(root, "gpt2"), root / "hf-gpt2"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Generator.load(bundle, threads=1), model


def torch_log_probs(model, ids: list[int]) -> torch.Tensor:
    """Per-position logits of one unpadded row, in float64: new x vocab."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def hf_marginal(model, prompts: list[list[int]], answer: list[int], doc_scores) -> torch.Tensor:
    """RagTokenForGeneration.marginalize over the logits that predict each answer token: N x V."""
    n = len(answer)
    seq_logits = torch.stack(
        [torch_log_probs(model, p + answer)[len(p) - 1 : len(p) - 1 + n] for p in prompts]
    )  # K x N x V
    scores = torch.tensor([doc_scores], dtype=torch.float64)  # 1 x K
    return RagTokenForGeneration.marginalize(None, seq_logits, scores, n_docs=len(prompts))[0]


@pytest.mark.parametrize("answer", ANSWERS)
def test_score_matches_hf_marginalize_and_sequence_nll(models, answer):
    gen, model = models
    template = PromptTemplate.parse(gen.prompt_template)
    log_prior = torch.log_softmax(torch.tensor(DOC_SCORES, dtype=torch.float64), 0).numpy()
    result = score_answer(gen, template, PASSAGES, log_prior, QUESTION, answer)
    ids = result.answer_ids
    assert ids == gen.encode(answer) and len(ids) >= 2
    prompts = passage_prompts(gen, template, PASSAGES, QUESTION)

    # TOKEN: HF's marginalize, gathered at the answer tokens.
    marginal = hf_marginal(model, prompts, ids, DOC_SCORES)  # N x V
    want_token = marginal[torch.arange(len(ids)), torch.tensor(ids)].numpy()
    np.testing.assert_allclose(result.token.token_logprobs, want_token, rtol=0, atol=ATOL)
    assert result.token.logprob == pytest.approx(want_token.sum(), abs=ATOL * len(ids))

    # SEQUENCE: logsumexp_k [log_softmax(doc_scores)_k + sum_t log p_k(y_t)] in torch.
    per_doc = torch.stack(
        [
            torch.log_softmax(torch_log_probs(model, p + ids), -1)[
                torch.arange(len(p) - 1, len(p) - 1 + len(ids)), torch.tensor(ids)
            ].sum()
            for p in prompts
        ]
    )  # K
    doc_logprobs = torch.log_softmax(torch.tensor(DOC_SCORES, dtype=torch.float64), 0)
    want_seq = torch.logsumexp(doc_logprobs + per_doc, 0).item()
    assert result.sequence.logprob == pytest.approx(want_seq, abs=ATOL * len(ids))
    want_posterior = torch.softmax(doc_logprobs + per_doc, 0).numpy()
    np.testing.assert_allclose(result.sequence.posterior, want_posterior, atol=ATOL)
    # The passages must matter, or the mixtures above could not tell a wrong prior from a right one.
    assert float(per_doc.max() - per_doc.min()) > 0.5


@pytest.fixture(scope="module")
def retrieval(tiny_encoder_dir, tiny_index_dir):
    from ragmix.engine.retrieval import RetrievalBatcher, Retriever
    from ragmix.index import IndexBundle
    from ragmix.models.encoder import Encoder

    enc = Encoder.load(tiny_encoder_dir, threads=1)
    idx = IndexBundle.load(tiny_index_dir, encoder_fingerprint=enc.fingerprint)
    return lambda: RetrievalBatcher(Retriever(enc, idx))


async def engine_greedy(gen: Generator, retrieval, query: str, k: int, n: int):
    from ragmix.engine.engine import Engine, EngineConfig
    from ragmix.engine.outputs import PassagesEvent, TokenEvent
    from ragmix.engine.params import DecodingParams, Limits, Mixture, RetrievalParams

    limits = Limits(max_top_k=8, default_top_k=k, max_new_tokens=64, default_max_new_tokens=n)
    engine = Engine(gen, retrieval(), EngineConfig(limits=limits))
    engine.start()
    try:
        events = [
            ev
            async for ev in engine.generate(
                RetrievalParams(query, top_k=k), DecodingParams(max_new_tokens=n), Mixture.TOKEN
            )
        ]
    finally:
        engine.shutdown()
    passages = next(e for e in events if isinstance(e, PassagesEvent)).passages
    return passages, [e for e in events if isinstance(e, TokenEvent)]


def test_engine_greedy_token_equals_hf_marginal_greedy(models, retrieval):
    gen, model = models
    n = 8
    passages, tokens = asyncio.run(
        engine_greedy(gen, retrieval, "What does the yield statement do?", 3, n)
    )
    template = PromptTemplate.parse(gen.prompt_template)
    prompts = passage_prompts(
        gen, template, [(p.title, p.text) for p in passages], "What does the yield statement do?"
    )
    doc_scores = np.log([p.prior for p in passages])  # log_softmax of these is the same prior
    want, want_logprobs = [], []
    for _ in range(n):
        seq_logits = torch.stack([torch_log_probs(model, p + want)[-1:] for p in prompts])
        scores = torch.from_numpy(doc_scores[None])  # 1 x K
        marginal = RagTokenForGeneration.marginalize(None, seq_logits, scores, n_docs=len(prompts))
        top2 = torch.topk(marginal[0, 0], 2)
        assert float(top2.values[0] - top2.values[1]) > MIN_GAP, "greedy tie: choose another seed"
        want.append(int(top2.indices[0]))
        want_logprobs.append(float(top2.values[0]))
        if want[-1] in gen.eos_token_ids:
            break
    assert [t.id for t in tokens] == want
    np.testing.assert_allclose([t.logprob for t in tokens], want_logprobs, atol=ATOL)


def test_beam_search_equals_hf_generate(models, monkeypatch):
    """Same hypotheses and scores as HF `generate(num_beams=3)`, with an EOS token the model emits
    early (so finished beams, the length penalty and early stopping are all exercised)."""
    from ragmix.engine.sequence import beam_search

    gen, model = models
    template = PromptTemplate.parse(gen.prompt_template)
    prompt = passage_prompts(gen, template, PASSAGES[:1], QUESTION)[0]
    n, beams = 6, 3
    for eos in beam_search(gen, [prompt], beams, n)[0][0].ids[1:]:  # tokens the best beam emits
        monkeypatch.setattr(gen, "eos_token_ids", frozenset({eos}))
        hyps = beam_search(gen, [prompt], beams, n)[0]
        if any(h.finished for h in hyps):
            break
    assert any(h.finished for h in hyps), "no token of the best beam ends a returned hypothesis"

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=beams,
            num_return_sequences=beams,
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=gen.pad_token_id,
            length_penalty=1.0,
            early_stopping=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    want = []
    for row in out.sequences[:, len(prompt) :].tolist():
        want.append(row[: row.index(eos) + 1] if eos in row else row)
    assert [h.scored_ids for h in hyps] == want
    np.testing.assert_allclose([h.score for h in hyps], out.sequences_scores.numpy(), atol=1e-4)

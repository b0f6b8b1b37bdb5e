"""The RAG-Token baseline written directly with Hugging Face transformers in PyTorch.

Same weights as ragmix's default generator (SmolLM2-135M-Instruct dequantised from its GGUF to
fp32), same passages and the very same prompt token ids (the caller passes them in). K rows share
one DynamicCache; rows of different lengths are left-padded with an attention mask and position ids
that skip the padding. Every step marginalizes exactly as transformers'
`RagTokenForGeneration.marginalize`: log_softmax over the vocabulary per row, plus the log prior
(log_softmax of the document scores), logsumexp over the K rows; greedy takes the argmax and feeds
it back to every row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)


def load_model(threads: int | None = None) -> Any:
    """LlamaForCausalLM from the SmolLM2 GGUF in fp32 (the weights ragmix's bundle was exported from)."""
    import torch
    from transformers import LlamaForCausalLM

    from ragmix.models.defaults import find_smollm2_gguf

    if threads:
        torch.set_num_threads(threads)
    folder, gguf = find_smollm2_gguf()
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    LOG.info("loaded %s/%s in %.1f s", folder, gguf, time.perf_counter() - t0)
    return model


@dataclass
class LoopResult:
    """One greedy RAG-Token generation."""

    tokens: list[int]
    prefill_s: float
    """Prefill of the K prompts plus the first marginalize: the loop's time to first token."""
    step_s: list[float] = field(default_factory=list)
    """Wall time of each decode step after the first token (forward + marginalize + argmax)."""
    top2: list[tuple[int, float, int, float]] = field(default_factory=list)
    """Per generated token: (best id, its mixture log-prob, runner-up id, its log-prob)."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        return len(self.step_s) / sum(self.step_s) if self.step_s else None


def marginalize(logits: Any, log_prior: Any) -> Any:
    """log p(y) = logsumexp_j(log_softmax(logits_j) + log_softmax(scores)_j), as HF's RAG-Token.

    logits: K x V (one question); log_prior: K. Returns V.
    """
    import torch

    seq_logprobs = torch.log_softmax(logits, dim=-1)  # K x V
    doc_logprobs = torch.log_softmax(log_prior, dim=0)  # K
    return torch.logsumexp(seq_logprobs + doc_logprobs.unsqueeze(-1), dim=0)  # V


def rag_token_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    prior: Sequence[float],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> LoopResult:
    """Greedy RAG-Token decoding of K prompt rows; stops at EOS (kept) or max_new_tokens."""
    import torch
    from transformers import DynamicCache

    k = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((k, width), pad_id, dtype=torch.long)  # K x width
    mask = torch.zeros((k, width), dtype=torch.long)  # K x width
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # K x width
    with np.errstate(divide="ignore"):
        log_prior = torch.tensor(np.log(np.asarray(prior, dtype=np.float64)), dtype=torch.float32)
    eos = set(int(e) for e in eos_ids)

    tokens: list[int] = []
    top2: list[tuple[int, float, int, float]] = []
    steps: list[float] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = positions[:, -1:] + 1  # K x 1
        while True:
            marginal = marginalize(out.logits[:, -1, :], log_prior)  # V
            best = torch.topk(marginal, 2)
            b = [int(x) for x in best.indices]
            v = [float(x) for x in best.values]
            token = b[0]
            tokens.append(token)
            top2.append((b[0], v[0], b[1], v[1]))
            now = time.perf_counter()
            if len(tokens) == 1:
                prefill_s = now - t0
            else:
                steps.append(now - t0)
            if token in eos or len(tokens) >= max_new_tokens:
                break
            t0 = time.perf_counter()
            mask = torch.cat([mask, torch.ones((k, 1), dtype=torch.long)], dim=1)  # K x total
            out = model(
                input_ids=torch.full((k, 1), token, dtype=torch.long),
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1
    return LoopResult(tokens, prefill_s, steps, top2)

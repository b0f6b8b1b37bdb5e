"""The default generator bundle (SmolLM2-135M-Instruct, exported from its GGUF) against PyTorch, and
one real answer through the ONNX runtime. Builds the default bundles into the cache on first use
(a few minutes on 2 cores), then reuses them."""

from __future__ import annotations

import numpy as np
import pytest

from ragmix import paths
from ragmix.models.defaults import ensure_default_models, find_smollm2_gguf
from ragmix.models.generator import Generator, positions_from_mask

pytestmark = pytest.mark.e2e

PASSAGE = (
    "Paris is the capital and most populous city of France. It is known for the Eiffel Tower, "
    "the Louvre and the river Seine."
)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def generator() -> Generator:
    generator_dir, _ = ensure_default_models(paths.cache_dir(), progress=False)
    return Generator.load(generator_dir)


@pytest.fixture(scope="module")
def torch_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, gguf = find_smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def prompt_ids(generator: Generator) -> list[int]:
    return generator.encode(generator.prompt_template.format(passage=PASSAGE, question=QUESTION))


def test_manifest_describes_smollm2(generator):
    assert generator.name == paths.DEFAULT_GENERATOR
    assert generator.eos_token_ids == {generator.tokenizer.token_to_id("<|im_end|>")} == {2}
    assert (generator.num_layers, generator.num_kv_heads, generator.head_dim) == (30, 3, 64)
    assert generator.vocab_size == 49152
    assert generator.prompt_template.endswith("<|im_start|>assistant\n")


def test_onnx_logits_match_pytorch(generator, torch_model):
    import torch

    ids = prompt_ids(generator)
    n = len(ids)
    mask = np.ones((1, n), dtype=np.int64)  # 1 x n
    prefix = n - 1  # prefill all but the last token, then one decode step with the past
    logits, past = generator.forward(
        np.array([ids[:prefix]]),
        mask[:, :prefix],
        positions_from_mask(mask[:, :prefix], prefix),
        generator.empty_cache(1),
        np.array([list(range(prefix))]),
    )
    step, _ = generator.forward(
        np.array([ids[prefix:]]), mask, positions_from_mask(mask, 1), past, np.array([[0]])
    )
    with torch.no_grad():
        want = torch_model(torch.tensor([ids])).logits[0].numpy()  # n x vocab
    got = np.concatenate([logits[0], step[0]])  # n x vocab
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_greedy_answer_names_paris(generator):
    ids = prompt_ids(generator)
    mask = np.ones((1, len(ids)), dtype=np.int64)  # 1 x total
    logits, past = generator.forward(
        np.array([ids]),
        mask,
        positions_from_mask(mask, len(ids)),
        generator.empty_cache(1),
        np.array([[len(ids) - 1]]),
    )
    answer: list[int] = []
    for _ in range(24):
        token = int(logits[0, -1].argmax())
        if token in generator.eos_token_ids:
            break
        answer.append(token)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = generator.forward(
            np.array([[token]]), mask, positions_from_mask(mask, 1), past, np.array([[0]])
        )
    assert "Paris" in generator.decode(answer)

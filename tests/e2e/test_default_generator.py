"""The default generator bundle (SmolLM2-135M-Instruct: the fused graph over its GGUF's own 4-bit
blocks) against PyTorch and against the same graph over the dequantized weights, and one real
answer through the ONNX runtime. Builds the default bundles into the cache on first use (a few
minutes on 2 cores), then reuses them."""

from __future__ import annotations

import numpy as np
import pytest

from ragmix import paths
from ragmix.models.defaults import ensure_default_models, find_smollm2_gguf
from ragmix.models.generator import Generator

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


def prefill_then_step(generator: Generator, ids: list[int]) -> np.ndarray:
    """Logits at every position: all but the last token in one pass, then a decode step."""
    cache = generator.new_cache(1, len(ids))
    prefix = len(ids) - 1
    first = generator.forward(
        np.array([ids[:prefix]]), np.zeros(1, np.int64), np.array([list(range(prefix))]), cache
    )
    step = generator.forward(np.array([ids[prefix:]]), np.array([prefix]), np.zeros((1, 1)), cache)
    return np.concatenate([first[0], step[0]])  # n x vocab


def test_default_bundle_serves_the_ggufs_4_bit_blocks(generator):
    assert generator.manifest["graph"] == "fused"
    assert generator.manifest["precision"] in ("q4", "q4-a8")
    assert (generator.folder / "model.onnx").stat().st_size < 250e6  # fp32 weights: 650 MB


def test_onnx_logits_match_pytorch(generator, torch_model):
    import torch

    ids = prompt_ids(generator)
    with torch.no_grad():
        want = torch_model(torch.tensor([ids])).logits[0].numpy()  # n x vocab
    got = prefill_then_step(generator, ids)
    tolerance = 1e-4 if generator.manifest["precision"] == "q4" else 0.1
    assert np.abs(got - want).max() / np.abs(want).max() <= tolerance


def test_q4_graph_equals_the_fp32_graph_of_the_dequantized_weights(tmp_path):
    """The exactness claim on the real model: MatMulNBits + the block-sum correction computes the
    Q4_1 blocks' own values (fp32 accumulation), not a requantisation."""
    from ragmix.models.generator_export import export_generator

    folder, gguf = find_smollm2_gguf()
    graphs = {
        p: Generator.load(export_generator(folder, tmp_path / p, gguf_file=gguf, precision=p))
        for p in ("fp32", "q4")
    }
    ids = graphs["q4"].encode(
        graphs["q4"].prompt_template.format(passage=PASSAGE, question=QUESTION)
    )
    want = prefill_then_step(graphs["fp32"], ids)
    got = prefill_then_step(graphs["q4"], ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_greedy_answer_names_paris(generator):
    ids = prompt_ids(generator)
    cache = generator.new_cache(1, len(ids) + 32)
    logits = generator.forward(
        np.array([ids]), np.zeros(1, np.int64), np.array([[len(ids) - 1]]), cache
    )
    answer: list[int] = []
    for _ in range(24):
        token = int(logits[0, -1].argmax())
        if token in generator.eos_token_ids:
            break
        answer.append(token)
        logits = generator.forward(
            np.array([[token]]), np.array([len(ids) + len(answer) - 1]), np.zeros((1, 1)), cache
        )
    assert "Paris" in generator.decode(answer)

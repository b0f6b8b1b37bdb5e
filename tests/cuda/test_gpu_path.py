"""The GPU path on a real device: IO-bound CUDA decoding against CPU decoding, no host copy of
logits or KV in a RAG-Token step, FAISS GPU top-K against the CPU index.

Needs onnxruntime's CUDA provider, CuPy and a visible device (benchmarks/gpu_check.sh runs it
with RAGMIX_CUDA_TESTS=1); skipped everywhere else, including the CUDA simulator. The default
bundle's check runs when RAGMIX_CUDA_DEFAULT=1 (it builds the bundle on first use).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import onnxruntime as ort
import pytest

from ragmix.models import arrays
from ragmix.models import device as dev
from ragmix.models.generator import Generator

if (
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    or dev.CUDA not in ort.get_available_providers()
    or not dev.has_cupy()
):
    pytest.skip("needs onnxruntime-gpu, CuPy and a CUDA device", allow_module_level=True)

import cupy

PROMPTS = ["Paris is the capital of", "The quick brown fox jumps", "A passage is a short piece"]
STEPS = 24


def greedy_on_cpu(generator: Generator, prompts: list[list[int]]) -> tuple[list, list]:
    """Greedy tokens and every step's logits, decoded on the CPU one token per pass."""
    rows, width = len(prompts), max(map(len, prompts))
    cache = generator.new_cache(rows, width + STEPS)
    return _decode(generator, prompts, cache, forced=None)


def _decode(generator: Generator, prompts: list[list[int]], cache: list, forced) -> tuple:
    """Prefill then STEPS single-token passes; `forced` (steps x rows) feeds given tokens instead
    of the argmax, so both devices see the same inputs whatever the near-ties do."""
    lengths = np.array([len(p) for p in prompts], np.int64)
    ids = np.full((len(prompts), int(lengths.max())), generator.pad_token_id, np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    logits = generator.forward(ids, np.zeros_like(lengths), (lengths - 1)[:, None], cache)[:, 0]
    tokens, seen = [], []
    for step in range(STEPS):
        host = cupy.asnumpy(logits) if arrays.on_device(logits) else logits
        seen.append(host)
        chosen = host.argmax(-1) if forced is None else forced[step]
        tokens.append(chosen)
        logits = generator.forward(chosen[:, None], lengths, np.zeros((len(prompts), 1), np.int64),
                                   cache)[:, 0]  # fmt: skip
        lengths = lengths + 1
    return np.array(tokens), seen


def assert_same_greedy(cpu: Generator, gpu: Generator, prompts: list[str]) -> None:
    ids = [cpu.encode(p) for p in prompts]
    tokens, cpu_logits = greedy_on_cpu(cpu, ids)
    cache = gpu.device_cache(len(ids), max(map(len, ids)) + STEPS)
    assert arrays.on_device(cache[0])
    _, gpu_logits = _decode(gpu, ids, cache, forced=tokens)
    for step, (a, b) in enumerate(zip(cpu_logits, gpu_logits, strict=True)):
        np.testing.assert_allclose(b, a, atol=2e-3 * max(1.0, float(np.abs(a).max())))
        top_two = np.sort(a, axis=-1)[:, -2:]
        decided = top_two[:, 1] - top_two[:, 0] > 1e-2  # a near-tie may flip on another device
        assert (b.argmax(-1)[decided] == tokens[step][decided]).all(), f"step {step}"


def load_pair(folder) -> tuple[Generator, Generator]:
    cpu = Generator.load(folder, providers=dev.Device("cpu").providers())
    gpu = Generator.load(folder, providers=dev.Device("cuda", 0).providers())
    dev.Device("cuda", 0).check_placed(gpu.session, "generator")
    assert gpu.device_kind == "cuda" and cpu.device_kind == "cpu"
    return cpu, gpu


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_io_bound_cuda_decoding_equals_cpu_decoding_on_tiny_bundles(family, tmp_path):
    from tiny_models import tiny_generator_bundle

    cpu, gpu = load_pair(tiny_generator_bundle(tmp_path / family, family))
    assert_same_greedy(cpu, gpu, PROMPTS)


@pytest.mark.skipif(os.environ.get("RAGMIX_CUDA_DEFAULT") != "1", reason="RAGMIX_CUDA_DEFAULT=1")
def test_io_bound_cuda_decoding_equals_cpu_decoding_on_the_default_bundle():
    from ragmix import paths
    from ragmix.models import defaults

    folder, _ = defaults.ensure_default_models(paths.cache_dir())
    cpu, gpu = load_pair(folder)
    assert_same_greedy(cpu, gpu, ["What does the yield statement do?", "Why is the sky blue?"])


def test_a_rag_token_answer_makes_no_host_copy_of_logits_or_kv(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir
):
    """CuPy refuses implicit conversion to numpy, so any host copy the step made would have to go
    through arrays.to_host, which counts: a whole RAG-Token answer must count none."""
    from ragmix.config import ServerConfig
    from ragmix.engine.loader import load_engine
    from ragmix.engine.outputs import TokenEvent
    from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams

    config = ServerConfig(
        device="cuda", generator=str(tiny_generator_dir), encoder=str(tiny_encoder_dir),
        index=str(tiny_index_dir), passage_cache_bytes=0,
    ).validate()  # fmt: skip
    engine = load_engine(config)
    engine.start()

    async def answer() -> list[int]:
        params = DecodingParams(max_new_tokens=16, min_new_tokens=16, temperature=0.0)
        events = engine.generate(RetrievalParams("yield", top_k=5), params, Mixture.TOKEN)
        return [e.id async for e in events if isinstance(e, TokenEvent)]

    try:
        asyncio.run(answer())  # warm: the first answer may copy while shapes settle
        before = arrays.host_copies()
        ids = asyncio.run(answer())
    finally:
        engine.shutdown()
    assert len(ids) == 16
    assert arrays.host_copies() == before


def test_faiss_gpu_top_k_equals_the_cpu_index_on_flat():
    import faiss

    from ragmix.index.gpu import GpuFlat, gpus
    from ragmix.index.tombstones import Tombstones

    if gpus() == 0:
        pytest.skip("this FAISS build has no GPU support (faiss-cpu)")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((100_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(100_000, 64, replace=False)] + 0.1
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    want_scores, want_rows = index.search(queries, 20)
    gone = Tombstones(None)
    got_scores, got_rows = GpuFlat(index, 0).search(queries, 20, gone.masked, 0)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-4)
    apart = np.diff(want_scores, axis=1) < -1e-4  # rank j and j + 1 not a near-tie
    edge = np.ones((64, 1), bool)
    clear = np.hstack([edge, apart]) & np.hstack([apart, edge])  # apart from both neighbours
    assert clear.mean() > 0.5
    assert (got_rows[clear] == want_rows[clear]).all()


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_cuda_decoding_equals_cpu_decoding(family, tmp_path):
    """The encoder's cross K/V written into the device cache, then decoder passes over it."""
    from tiny_seq2seq import tiny_seq2seq_bundle

    from ragmix.models.seq2seq import Seq2SeqGenerator

    folder = tiny_seq2seq_bundle(tmp_path, family)
    cpu = Seq2SeqGenerator.load(folder, providers=dev.Device("cpu").providers())
    gpu = Seq2SeqGenerator.load(folder, providers=dev.Device("cuda", 0).providers())
    for session in gpu.sessions:
        dev.Device("cuda", 0).check_placed(session, "generator")
    sources = [cpu.encode(p) for p in PROMPTS]
    e = np.array([len(s) for s in sources], np.int64)
    rows = [s + list(cpu.decoder_start_ids) for s in sources]
    ids = np.full((len(rows), max(map(len, rows))), cpu.pad_token_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    first = (np.array([len(r) for r in rows]) - 1)[:, None]
    seen = {}
    for name, gen, cache in (
        ("cpu", cpu, cpu.new_cache(len(rows), ids.shape[1] + STEPS)),
        ("cuda", gpu, gpu.device_cache(len(rows), ids.shape[1] + STEPS)),
    ):
        lengths = np.zeros(len(rows), np.int64)
        logits = gen.forward(ids, lengths, first, cache, e)[:, 0]
        lengths = np.array([len(r) for r in rows], np.int64)
        out = []
        for step in range(STEPS):
            host = cupy.asnumpy(logits) if arrays.on_device(logits) else logits
            out.append(host)
            chosen = seen["cpu"][step].argmax(-1) if "cpu" in seen else host.argmax(-1)
            index = np.zeros((len(rows), 1), np.int64)
            logits = gen.forward(chosen[:, None], lengths, index, cache, e)[:, 0]
            lengths = lengths + 1
        seen[name] = out
    for a, b in zip(seen["cpu"], seen["cuda"], strict=True):
        np.testing.assert_allclose(b, a, atol=2e-3 * max(1.0, float(np.abs(a).max())))

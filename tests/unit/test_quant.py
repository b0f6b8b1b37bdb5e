"""GGML blocks read exactly, and the 4-bit fused graph computing exactly what they stand for.

The exactness claim: a Q4_1 block w = d*q + m goes through MatMulNBits (scale d, zero point 8) plus
the block-sum correction (m + 8d), and the q4 graph's logits equal those of the fp32 graph over the
dequantized weights within 1e-4 relative, on tiny random-weight models quantized to Q4_1 first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import FAMILIES, build_tiny_causal_lm

from ragmix.models import checkpoint, quant
from ragmix.models.generator import Generator

pytest.importorskip("torch")


def ggml_q4_1_bytes(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks laid out as llama.cpp writes them: fp16 d, fp16 m, byte j = q[j] | q[j+16] << 4."""
    n, nb, _ = q.shape
    out = np.zeros((n, nb, quant.Q4_1_BYTES), np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(n, -1)


def test_q4_1_blocks_parse_to_d_q_plus_m():
    rng = np.random.default_rng(0)
    d = rng.random((3, 2)).astype(np.float16).astype(np.float32)
    m = -rng.random((3, 2)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (3, 2, 32)).astype(np.uint8)
    w = quant.parse_q4_1(ggml_q4_1_bytes(d, m, q), 3, 64)
    np.testing.assert_array_equal(w.q, q)
    np.testing.assert_array_equal(w.dequantize(), (d[..., None] * q + m[..., None]).reshape(3, 64))


def test_q8_0_blocks_parse_to_d_q():
    rng = np.random.default_rng(1)
    d = rng.random((2, 1)).astype(np.float16)
    q = rng.integers(-128, 128, (2, 1, 32)).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(2, 1, 2), q.view(np.uint8)], axis=-1)
    w = quant.parse_q8_0(raw.reshape(2, -1), 2, 32)
    np.testing.assert_array_equal(w.dequantize(), d.astype(np.float32) * q.reshape(2, 32))


def test_a_block_count_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="need 40 bytes"):
        quant.parse_q4_1(np.zeros(39, np.uint8), 1, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.parse_q8_0(np.zeros(34, np.uint8), 1, 33)


def matmul_nbits(w: quant.Q4_1 | quant.Q8_0, x: np.ndarray) -> np.ndarray:
    """x @ w.T through MatMulNBits (+ the block-sum correction): what the q4 graph runs."""
    nb = quant.to_nbits(w)
    inits = [numpy_helper.from_array(nb.packed, "B"), numpy_helper.from_array(nb.scales, "s")]
    nodes = [
        helper.make_node(
            "MatMulNBits", ["x", "B", "s"], ["y0"], domain="com.microsoft", K=nb.k, N=nb.n,
            bits=nb.bits, block_size=32, accuracy_level=0,
        )
    ]  # fmt: skip
    out = "y0"
    if nb.correction is not None:
        inits += [
            numpy_helper.from_array(np.array([0, nb.k // 32, 32]), "shape"),
            numpy_helper.from_array(np.array([-1]), "axes"),
            numpy_helper.from_array(nb.correction, "c"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "shape"], ["blocks"]),
            helper.make_node("ReduceSum", ["blocks", "axes"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "c"], ["corr"]),
            helper.make_node("Add", ["y0", "corr"], ["y"]),
        ]
        out = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", nb.k])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["M", nb.n])], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    blocks=st.integers(1, 4),
    rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_matmul_nbits_with_the_correction_computes_q4_1_blocks_exactly(
    n, blocks, rows, seed, scale
):
    rng = np.random.default_rng(seed)
    w = quant.quantize_q4_1(rng.normal(0, scale, (n, 32 * blocks)))
    x = rng.normal(size=(rows, 32 * blocks)).astype(np.float32)
    want = x.astype(np.float64) @ w.dequantize().T.astype(np.float64)
    got = matmul_nbits(w, x)
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-30)


def test_matmul_nbits_computes_q8_0_blocks_exactly():
    rng = np.random.default_rng(3)
    w = quant.quantize_q8_0(rng.normal(size=(50, 64)))
    x = rng.normal(size=(4, 64)).astype(np.float32)
    want = x.astype(np.float64) @ w.dequantize().T.astype(np.float64)
    assert np.abs(matmul_nbits(w, x) - want).max() <= 1e-5 * np.abs(want).max()


def test_rounding_to_q4_1_stays_within_half_a_step():
    w = np.random.default_rng(4).normal(size=(8, 64)).astype(np.float32)
    blocks = quant.quantize_q4_1(w)
    step = np.repeat(blocks.d, 32, axis=1)
    assert np.all(np.abs(blocks.dequantize() - w) <= 0.5 * step + 1e-3 * np.abs(w).max())


def test_gguf_query_rows_are_unpermuted_to_the_rotate_half_layout():
    """llama.cpp interleaves each head's two rotary halves; whole rows move back, blocks intact."""
    heads, head_dim, k = 3, 8, 32
    hf = np.arange(heads * head_dim * k, dtype=np.float32).reshape(heads * head_dim, k)
    gguf = hf.reshape(heads, 2, head_dim // 2, k).swapaxes(1, 2).reshape(hf.shape)  # its permute
    np.testing.assert_array_equal(gguf[checkpoint._unpermute_rows(heads * head_dim, heads)], hf)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, dict[str, Generator]]:
    """Per family, the same Q4_1 weights exported at each precision."""
    from ragmix.models.generator_export import export_generator

    root = tmp_path_factory.mktemp("quantized")
    out: dict[str, dict[str, Generator]] = {}
    for family in FAMILIES:
        src = build_tiny_causal_lm(root / f"hf-{family}", family)
        out[family] = {
            p: Generator.load(
                export_generator(src, root / f"{family}-{p}", quantize="int4", precision=p),
                threads=1,
            )
            for p in ("fp32", "q4", "q4-a8")
        }
    return out


def run_rows(gen: Generator) -> np.ndarray:
    """A padded prompt batch, then a decode step over pasts of different lengths: all logits."""
    rows = [[5, 9, 11, 40, 3, 7, 8], [12, 13, 14], [200]]
    ids = np.full((3, 7), gen.pad_token_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    cache = gen.new_cache(3, 16)
    first = gen.forward(ids, np.zeros(3, np.int64), np.tile(np.arange(7), (3, 1)), cache)
    lengths = np.array([len(r) for r in rows])
    step = gen.forward(np.array([[1], [2], [3]]), lengths, np.zeros((3, 1), np.int64), cache)
    return np.concatenate([first[0, :7], first[1, :3], first[2, :1], step[:, 0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_q4_graph_equals_the_dequantized_fp32_graph(quantized, family):
    want = run_rows(quantized[family]["fp32"])
    got = run_rows(quantized[family]["q4"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_activations_move_the_logits_a_little_but_not_nothing(quantized, family):
    exact = run_rows(quantized[family]["q4"])
    a8 = run_rows(quantized[family]["q4-a8"])
    rel = np.abs(a8 - exact).max() / np.abs(exact).max()
    assert 1e-6 < rel < 0.2  # a different computation, close to the exact one


def test_the_q4_bundle_stores_4_bit_weights_and_the_embedding_once(quantized):
    import onnx

    for precision, gen in quantized["llama"].items():
        model = onnx.load(str(gen.folder / "model.onnx"))
        ops = [n.op_type for n in model.graph.node]
        vocab_tables = [
            t for t in model.graph.initializer if t.dims and t.dims[0] == gen.vocab_size
        ]
        assert len(vocab_tables) <= 2, precision  # the table (and, 8-bit, its scales): once
        if precision == "fp32":
            assert "MatMulNBits" not in ops
        else:
            assert ops.count("MatMulNBits") >= 4 * gen.num_layers
        assert ops.count("GroupQueryAttention") == gen.num_layers
        assert gen.manifest["precision"] == precision

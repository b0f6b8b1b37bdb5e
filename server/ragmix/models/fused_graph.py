"""A decoder-only generator as a graph of onnxruntime's fused operators, built node by node.

The layout follows onnxruntime-genai's model builder: per layer one packed QKV MatMul, one
GroupQueryAttention (rotary inside, past and present sharing one buffer, so the new keys and values
are written in place at each row's own length), SkipSimplifiedLayerNormalization for residual + norm,
one packed gate/up MatMul; the tied embedding is stored once and serves both the Gather and the LM
head; logits only at the asked positions. No per-step shape arithmetic beyond the logits gather.

The contract the engine drives (see generator.py):
  input_ids [B, S] int64 (rows right-padded to S), seqlens_k [B] int32 (= row's past + S - 1),
  total_sequence_length [] int32 (max over rows of past + S), logits_index [B, W] int64,
  past_key_values.{i}.key/value [B, kv_heads, capacity, head_dim] -> logits [B, W, V],
  present.{i}.key/value (the same buffers, bound to the same memory).

Weights come as fp32 arrays or GGML blocks (quant.py); `precision` picks how blocks are computed:
  fp32  - every weight dequantized to fp32 (the reference);
  q4    - Q4_1 blocks through MatMulNBits with fp32 accumulation plus the exact block-sum
          correction; Q8_0 (the tied embedding) dequantized (8-bit MatMulNBits has no fast fp32 path);
  q4-a8 - as q4 but MatMulNBits quantizes activations to int8 (accuracy level 4, as llama.cpp's
          Q8_1 dot products do), and the Q8_0 embedding stays 8-bit for Gather and LM head alike.
Needs onnx (the export extra); nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragmix.models import quant

PRECISIONS = ("fp32", "q4", "q4-a8")
MS = "com.microsoft"


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture numbers a fused graph needs (from a HF config or GGUF metadata)."""

    family: str  # "llama" (also mistral, qwen2: RMSNorm, rotary, SiLU gate) or "gpt2"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    norm_eps: float
    rope_theta: float = 10000.0
    activation: str = "silu"  # silu | gelu_new | gelu
    attention_scale: tuple[float, ...] | None = None  # per layer; None: 1/sqrt(head_dim)
    sliding_window: int | None = None


@dataclass
class Weights:
    """Logical weights, [N outputs, K inputs] like torch's Linear; per-layer dicts in `layers`.

    Layer keys: attn_norm (+ attn_norm_bias), qkv (+ qkv_bias), o (+ o_bias), mlp_norm
    (+ mlp_norm_bias), gate_up or fc (+ fc_bias), down (+ down_bias). Top level: embed,
    pos_embed (gpt2), final_norm (+ final_norm_bias), lm_head (None when tied to embed).
    """

    embed: quant.Weight
    final_norm: np.ndarray
    layers: list[dict[str, quant.Weight]]
    lm_head: quant.Weight | None = None
    pos_embed: np.ndarray | None = None
    final_norm_bias: np.ndarray | None = None


ATTENTIONS = ("gqa", "grouped")


def io_names(layers: int, attention: str = "gqa") -> dict[str, list[str]]:
    """Input and output names in graph order: the GroupQueryAttention graph's (past and present
    share one buffer) or the chunk graph's (grouped attention; the new keys/values as outputs)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    if attention == "grouped":
        new = [f"new.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        return {
            "inputs": ["input_ids", "past_lengths", "logits_index", *past],
            "outputs": ["logits", *new],
        }
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return {
        "inputs": ["input_ids", "seqlens_k", "total_sequence_length", "logits_index", *past],
        "outputs": ["logits", *present],
    }


@dataclass
class _Graph:
    """Nodes and initializers under construction, with unique names."""

    nodes: list[Any] = field(default_factory=list)
    inits: list[Any] = field(default_factory=list)
    counter: int = 0

    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def init(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op: str, inputs: list[str], hint: str, outputs: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        names = [self.name(f"{hint}/out{i}") for i in range(outputs)]
        domain = MS if op in _CONTRIB else ""
        self.nodes.append(
            helper.make_node(op, inputs, names, name=self.name(hint), domain=domain, **attrs)
        )
        return names[0] if outputs == 1 else names


_CONTRIB = {
    "GroupQueryAttention",
    "RotaryEmbedding",
    "FusedMatMul",
    "MatMulNBits",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "GatherBlockQuantized",
    "FastGelu",
    "Gelu",
}


def build(spec: DecoderSpec, weights: Weights, precision: str, attention: str = "gqa") -> Any:
    """The fused ONNX model (an onnx.ModelProto) of `weights` at `precision`.

    attention "gqa": GroupQueryAttention, the KV written in place (decode steps, prompts without a
    past); "grouped": the chunk graph, for several new tokens over pasts in more than one row,
    which GroupQueryAttention on CPU refuses (see `_Builder.grouped_attention`).
    """
    from onnx import TensorProto, helper

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
    if spec.head_dim % 16:
        raise ValueError(
            f"GroupQueryAttention needs head_dim a multiple of 16, this model has {spec.head_dim}."
        )
    g = _Graph()
    names = io_names(spec.layers, attention)
    b = _Builder(g, spec, precision)
    if attention == "grouped":
        b.shared_attention_inputs()
    x = b.embed(weights, "input_ids")
    if weights.pos_embed is not None:
        pos = b.pos if attention == "grouped" else b.positions()
        table = g.init("pos_embed", np.asarray(weights.pos_embed, np.float32))
        x = g.op("Add", [x, g.op("Gather", [table, pos], "pos")], "pos_embed")
    residual, normed = x, b.norm(x, weights.layers[0], "attn_norm")
    cos, sin = b.rotary_caches() if spec.family != "gpt2" else ("", "")
    attend = b.grouped_attention if attention == "grouped" else b.attention
    for i, layer in enumerate(weights.layers):
        attn = attend(normed, layer, i, cos, sin)
        normed, residual = b.skip_norm(attn, residual, layer, "mlp_norm")
        mlp = b.mlp(normed, layer, i)
        nxt = weights.layers[i + 1] if i + 1 < len(weights.layers) else None
        if nxt is not None:
            normed, residual = b.skip_norm(mlp, residual, nxt, "attn_norm")
        else:
            final = {"final_norm": weights.final_norm, "final_norm_bias": weights.final_norm_bias}
            normed, _ = b.skip_norm(mlp, residual, final, "final_norm")
    picked = g.op(
        "GatherND",
        [normed, g.op("Unsqueeze", ["logits_index", g.init("axes", np.array([-1]))], "index")],
        "pick",
        batch_dims=1,
    )  # B x W x hidden
    g.op("Identity", [b.lm_head(picked, weights)], "logits")
    g.nodes[-1].output[0] = "logits"

    kv_shape = ["batch", spec.kv_heads, "capacity", spec.head_dim]
    new_shape = ["batch", spec.kv_heads, "new", spec.head_dim]
    if attention == "grouped":
        control = [helper.make_tensor_value_info("past_lengths", TensorProto.INT64, ["batch"])]
        out_shape = new_shape
    else:
        control = [
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        out_shape = kv_shape
    first_past = 1 + len(control) + 1
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new"]),
        *control,
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch", "positions"]),
        *(
            helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape)
            for n in names["inputs"][first_past:]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", "positions", spec.vocab]
        ),
        *(
            helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shape)
            for n in names["outputs"][1:]
        ),
    ]
    graph = helper.make_graph(g.nodes, "ragmix_fused_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="ragmix")


class _Builder:
    """The subgraphs of one decoder, written into `g`."""

    def __init__(self, g: _Graph, spec: DecoderSpec, precision: str) -> None:
        self.g, self.spec, self.precision = g, spec, precision
        self.embed_weight: str | None = None  # the stored embedding, reused by a tied LM head
        self.embed_scales: str | None = None

    # -- weights -----------------------------------------------------------------------------

    def linear(self, x: str, w: quant.Weight, bias: np.ndarray | None, hint: str) -> str:
        """x [..., K] @ w.T [K, N] (+ bias), in the form `precision` gives this weight."""
        g = self.g
        if isinstance(w, quant.Q4_1) and self.precision != "fp32":
            y = self._nbits(x, quant.to_nbits(w), hint)
        else:
            y = g.op("MatMul", [x, g.init(f"{hint}.weight", quant.dense(w).T)], hint)
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{hint}.bias", np.asarray(bias, np.float32))], f"{hint}+b")
        return y

    def _nbits(self, x: str, w: quant.NBits, hint: str) -> str:
        g = self.g
        level = 4 if self.precision == "q4-a8" else 0
        y = g.op(
            "MatMulNBits",
            [x, g.init(f"{hint}.q", w.packed), g.init(f"{hint}.scales", w.scales)],
            hint,
            K=w.k,
            N=w.n,
            bits=w.bits,
            block_size=quant.BLOCK,
            accuracy_level=level,
        )
        if w.correction is None:
            return y
        # + blocksum(x) @ (m + 8d): x [..., K] -> [..., K/32, 32] -> sums [..., K/32]
        blocks = g.op(
            "Reshape",
            [x, g.init("shape", np.array([0, 0, w.k // quant.BLOCK, quant.BLOCK]))],
            f"{hint}/blocks",
        )
        sums = g.op(
            "ReduceSum", [blocks, g.init("axes", np.array([-1]))], f"{hint}/sums", keepdims=0
        )
        corr = g.op("MatMul", [sums, g.init(f"{hint}.min", w.correction)], f"{hint}/min")
        return g.op("Add", [y, corr], f"{hint}+min")

    def embed(self, weights: Weights, ids: str) -> str:
        g, e = self.g, weights.embed
        if isinstance(e, quant.Q8_0) and self.precision == "q4-a8":
            # One 8-bit tensor in MatMulNBits' layout [V, K/32, 32] serves the Gather and the head.
            nb = quant.to_nbits(e)
            self.embed_weight = g.init("embed.q", nb.packed)
            self.embed_scales = g.init("embed.scales", e.d)  # V x K/32
            scales = g.op(
                "Reshape", [self.embed_scales, g.init("shape", np.array([0, 0, 1]))], "embed/scales"
            )
            rows = g.op(
                "GatherBlockQuantized",
                [self.embed_weight, ids, scales],
                "embed",
                bits=8,
                block_size=quant.BLOCK,
                gather_axis=0,
                quantize_axis=2,
            )  # B x S x K/32 x 32
            return g.op(
                "Reshape", [rows, g.init("shape", np.array([0, 0, self.spec.hidden]))], "embed/rows"
            )
        self.embed_weight = g.init("embed.weight", quant.dense(e))  # V x hidden, stored once
        return g.op("Gather", [self.embed_weight, ids], "embed")

    def lm_head(self, x: str, weights: Weights) -> str:
        """logits [B, W, V]; a tied head reads the embedding's own tensor."""
        g, spec = self.g, self.spec
        if weights.lm_head is not None:
            return self.linear(x, weights.lm_head, None, "lm_head")
        if self.embed_scales is not None:  # the 8-bit blocks GatherBlockQuantized reads
            return g.op(
                "MatMulNBits",
                [x, self.embed_weight, self.embed_scales],
                "lm_head",
                K=spec.hidden,
                N=spec.vocab,
                bits=8,
                block_size=quant.BLOCK,
                accuracy_level=4,
            )
        flat = g.op("Reshape", [x, g.init("shape", np.array([-1, spec.hidden]))], "lm_head/flat")
        y = g.op("Gemm", [flat, self.embed_weight], "lm_head", transB=1)  # rows x V
        shape = g.op(
            "Concat",
            [
                g.op("Shape", ["logits_index"], "lm_head/bw"),
                g.init("vocab", np.array([spec.vocab])),
            ],
            "lm_head/shape",
            axis=0,
        )
        return g.op("Reshape", [y, shape], "lm_head/unflat")

    # -- blocks ------------------------------------------------------------------------------

    def norm(self, x: str, layer: dict[str, Any], key: str) -> str:
        g, spec = self.g, self.spec
        gamma = g.init(key, np.asarray(layer[key], np.float32))
        if spec.family == "gpt2":
            beta = g.init(f"{key}.bias", np.asarray(layer[f"{key}_bias"], np.float32))
            return g.op("LayerNormalization", [x, gamma, beta], key, axis=-1, epsilon=spec.norm_eps)
        return g.op("SimplifiedLayerNormalization", [x, gamma], key, axis=-1, epsilon=spec.norm_eps)

    def skip_norm(self, x: str, skip: str, layer: dict[str, Any], key: str) -> tuple[str, str]:
        """(norm(x + skip), x + skip) in one fused node."""
        g, spec = self.g, self.spec
        gamma = g.init(key, np.asarray(layer[key], np.float32))
        if spec.family == "gpt2":
            beta = g.init(f"{key}.bias", np.asarray(layer[f"{key}_bias"], np.float32))
            out = g.op(
                "SkipLayerNormalization",
                [x, skip, gamma, beta],
                key,
                outputs=4,
                epsilon=spec.norm_eps,
            )
        else:
            out = g.op(
                "SkipSimplifiedLayerNormalization",
                [x, skip, gamma],
                key,
                outputs=4,
                epsilon=spec.norm_eps,
            )
        return out[0], out[3]

    def rotary_caches(self) -> tuple[str, str]:
        """cos and sin [positions, head_dim/2], computed in float32 as transformers does, so
        the fused graph rotates exactly as the reference model."""
        spec = self.spec
        exponent = np.arange(0, spec.head_dim, 2, dtype=np.int64).astype(np.float32)
        inv = 1.0 / (np.float32(spec.rope_theta) ** (exponent / np.float32(spec.head_dim)))
        inv = inv.astype(np.float32)
        angles = np.arange(spec.max_positions, dtype=np.float32)[:, None] * inv[None]  # P x hd/2
        return (
            self.g.init("cos_cache", np.cos(angles)),
            self.g.init("sin_cache", np.sin(angles)),
        )

    def positions(self) -> str:
        """Each new token's position (GPT-2's absolute embeddings): row past + i, from seqlens_k
        (= past + S - 1)."""
        g = self.g
        s = g.op(
            "Gather",
            [g.op("Shape", ["input_ids"], "pos/shape"), g.init("one", np.array(1))],
            "pos/s",
        )
        past = g.op("Sub", [g.op("Cast", ["seqlens_k"], "pos/len", to=7), s], "pos/past")
        start = g.op("Add", [past, g.init("one", np.array(1, np.int64))], "pos/start")
        steps = g.op(
            "Range",
            [g.init("zero", np.array(0, np.int64)), s, g.init("one", np.array(1, np.int64))],
            "pos/range",
        )
        return g.op(
            "Add",
            [g.op("Unsqueeze", [start, g.init("axes", np.array([1]))], "pos/col"), steps],
            "pos/ids",
        )  # B x S

    def shared_attention_inputs(self) -> None:
        """What every layer's grouped attention shares, computed once per pass from past_lengths:

        pos [B, S]: each new token's position (its row's past + i: the slot it will occupy);
        bias [B, 1, 1, S, P + S]: 0 where a new token may attend (a past slot < its row's length,
        or a new token at or before it, within the sliding window if any), -inf elsewhere;
        the shapes the attention reshapes through.
        """
        g, spec = self.g, self.spec
        one, zero = g.init("one", np.array(1, np.int64)), g.init("zero", np.array(0, np.int64))
        ids_shape = g.op("Shape", ["input_ids"], "attn/ids_shape")
        batch = g.op("Gather", [ids_shape, g.init("i0", np.array([0]))], "attn/b")  # [1]
        new = g.op("Gather", [ids_shape, g.init("i1", np.array([1]))], "attn/s")  # [1]
        kv_shape = g.op("Shape", ["past_key_values.0.key"], "attn/kv_shape")
        past = g.op("Gather", [kv_shape, g.init("i2", np.array([2]))], "attn/p")  # [1]
        s0 = g.op("Squeeze", [new], "attn/s0")
        p0 = g.op("Squeeze", [past], "attn/p0")
        lengths = g.op("Unsqueeze", ["past_lengths", g.init("axes", np.array([1]))], "attn/len")
        steps = g.op("Range", [zero, s0, one], "attn/steps")  # S
        self.pos = g.op("Add", [lengths, steps], "attn/pos")  # B x S
        slots = g.op("Range", [zero, p0, one], "attn/slots")  # P
        bp = g.op("Concat", [batch, past], "attn/bp", axis=0)
        bs = g.op("Concat", [batch, new], "attn/bs", axis=0)
        key_pos = g.op(
            "Concat", [g.op("Expand", [slots, bp], "attn/kp0"), self.pos], "attn/key_pos", axis=1
        )  # B x (P + S): the position of every key a new token could see
        real = g.op(
            "Concat",
            [
                g.op("Less", [slots, lengths], "attn/in_past"),
                g.op("Expand", [g.init("true", np.array([True])), bs], "attn/new_real"),
            ],
            "attn/real",
            axis=1,
        )  # B x (P + S)
        q_pos = g.op("Unsqueeze", [self.pos, g.init("axes", np.array([2]))], "attn/qpos")
        k_pos = g.op("Unsqueeze", [key_pos, g.init("axes", np.array([1]))], "attn/kpos")
        allowed = g.op(
            "And",
            [
                g.op("LessOrEqual", [k_pos, q_pos], "attn/causal"),
                g.op("Unsqueeze", [real, g.init("axes", np.array([1]))], "attn/real3"),
            ],
            "attn/allowed",
        )  # B x S x (P + S)
        if spec.sliding_window:
            dist = g.op("Sub", [q_pos, k_pos], "attn/dist")
            window = g.init("window", np.array(spec.sliding_window, np.int64))
            allowed = g.op(
                "And", [allowed, g.op("Less", [dist, window], "attn/near")], "attn/windowed"
            )
        bias = g.op(
            "Where",
            [
                allowed,
                g.init("open", np.array(0.0, np.float32)),
                g.init("shut", np.array(-np.inf, np.float32)),
            ],
            "attn/bias3",
        )
        self.bias = g.op("Unsqueeze", [bias, g.init("axes", np.array([1, 2]))], "attn/bias")
        kvh = g.init("kvh", np.array([spec.kv_heads]))
        grp = g.init("grp", np.array([spec.heads // spec.kv_heads]))
        total = g.op("Add", [past, new], "attn/t")
        self.scores5 = g.op("Concat", [batch, kvh, grp, new, total], "attn/sh5", axis=0)
        gs = g.op("Mul", [grp, new], "attn/gs")
        self.scores4 = g.op("Concat", [batch, kvh, gs, total], "attn/sh4", axis=0)
        self.split_past_new = g.op("Concat", [past, new], "attn/split", axis=0)

    def grouped_attention(self, x: str, layer: dict[str, Any], i: int, cos: str, sin: str) -> str:
        """The new tokens over their rows' past slots and each other, for any rows and any S:
        batched matmuls over the whole cache, each KV head read once for its group of query
        heads, masked by `shared_attention_inputs`' bias. The new tokens' keys (rotated) and values
        are outputs, for the caller to write at slots [length, length + S)."""
        g, spec = self.g, self.spec
        h, kvh, hd = spec.heads, spec.kv_heads, spec.head_dim
        grp = h // kvh
        qkv = self.linear(x, layer["qkv"], layer.get("qkv_bias"), f"layers.{i}.qkv")
        q, k, v = g.op(
            "Split",
            [qkv, g.init("split", np.array([h * hd, kvh * hd, kvh * hd]))],
            f"layers.{i}.qkv_split",
            outputs=3,
            axis=-1,
        )
        if cos:
            q = g.op("RotaryEmbedding", [q, self.pos, cos, sin], f"layers.{i}.rope_q", num_heads=h)
            k = g.op(
                "RotaryEmbedding", [k, self.pos, cos, sin], f"layers.{i}.rope_k", num_heads=kvh
            )
        heads_last = g.init("shape", np.array([0, 0, kvh, hd]))
        for name, t in ((f"new.{i}.key", k), (f"new.{i}.value", v)):  # B x kvh x S x hd
            g.op("Transpose", [g.op("Reshape", [t, heads_last], f"{name}/heads")], name,
                 perm=[0, 2, 1, 3])  # fmt: skip
            g.nodes[-1].output[0] = name
        k_new, v_new = f"new.{i}.key", f"new.{i}.value"
        qg = g.op("Reshape", [q, g.init("shape", np.array([0, 0, kvh, grp, hd]))], f"layers.{i}.qg")
        qg = g.op("Transpose", [qg], f"layers.{i}.qgt", perm=[0, 2, 3, 1, 4])  # B kvh grp S hd
        qg = g.op("Reshape", [qg, g.init("shape", np.array([0, kvh, -1, hd]))], f"layers.{i}.q4")
        scale = float(spec.attention_scale[i]) if spec.attention_scale else hd**-0.5
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        scores = g.op(
            "Concat",
            [
                g.op("FusedMatMul", [qg, past_k], f"layers.{i}.qk_past", transB=1, alpha=scale),
                g.op("FusedMatMul", [qg, k_new], f"layers.{i}.qk_new", transB=1, alpha=scale),
            ],
            f"layers.{i}.scores",
            axis=-1,
        )  # B x kvh x (grp*S) x (P+S)
        scores = g.op("Reshape", [scores, self.scores5], f"layers.{i}.scores5")
        masked = g.op("Add", [scores, self.bias], f"layers.{i}.masked")
        probs = g.op("Softmax", [masked], f"layers.{i}.softmax", axis=-1)
        probs = g.op("Reshape", [probs, self.scores4], f"layers.{i}.probs4")
        p_past, p_new = g.op(
            "Split", [probs, self.split_past_new], f"layers.{i}.psplit", outputs=2, axis=-1
        )
        out = g.op(
            "Add",
            [
                g.op("MatMul", [p_past, past_v], f"layers.{i}.pv_past"),
                g.op("MatMul", [p_new, v_new], f"layers.{i}.pv_new"),
            ],
            f"layers.{i}.pv",
        )  # B x kvh x (grp*S) x hd
        out = g.op(
            "Reshape", [out, g.init("shape", np.array([0, kvh, grp, -1, hd]))], f"layers.{i}.o5"
        )
        out = g.op("Transpose", [out], f"layers.{i}.ot", perm=[0, 3, 1, 2, 4])  # B S kvh grp hd
        out = g.op("Reshape", [out, g.init("shape", np.array([0, 0, h * hd]))], f"layers.{i}.o3")
        return self.linear(out, layer["o"], layer.get("o_bias"), f"layers.{i}.o")

    def attention(self, x: str, layer: dict[str, Any], i: int, cos: str, sin: str) -> str:
        g, spec = self.g, self.spec
        qkv = self.linear(x, layer["qkv"], layer.get("qkv_bias"), f"layers.{i}.qkv")
        attrs: dict[str, Any] = {
            "num_heads": spec.heads,
            "kv_num_heads": spec.kv_heads,
            "do_rotary": int(spec.family != "gpt2"),
        }
        if spec.attention_scale is not None:
            attrs["scale"] = float(spec.attention_scale[i])
        if spec.sliding_window:
            attrs["local_window_size"] = int(spec.sliding_window)
        out = g.op(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                "seqlens_k",
                "total_sequence_length",
                cos,
                sin,
            ],
            f"layers.{i}.attn",
            outputs=3,
            **attrs,
        )
        g.nodes[-1].output[1] = f"present.{i}.key"
        g.nodes[-1].output[2] = f"present.{i}.value"
        return self.linear(out[0], layer["o"], layer.get("o_bias"), f"layers.{i}.o")

    def mlp(self, x: str, layer: dict[str, Any], i: int) -> str:
        g, spec = self.g, self.spec
        hint = f"layers.{i}"
        if "gate_up" in layer:
            both = self.linear(x, layer["gate_up"], None, f"{hint}.gate_up")
            gate, up = g.op(
                "Split",
                [both, g.init("split", np.array([spec.intermediate] * 2))],
                f"{hint}.split",
                outputs=2,
                axis=-1,
            )
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{hint}.sigmoid")], f"{hint}.silu")
            h = g.op("Mul", [act, up], f"{hint}.gated")
        else:
            h = self.linear(x, layer["fc"], layer.get("fc_bias"), f"{hint}.fc")
            h = g.op("FastGelu" if spec.activation == "gelu_new" else "Gelu", [h], f"{hint}.gelu")
        return self.linear(h, layer["down"], layer.get("down_bias"), f"{hint}.down")

"""Weights of a checkpoint in the fused graph's logical names: from a Hugging Face model's state
dict (fp32), or straight from a GGUF file's blocks (Q4_1 and Q8_0 kept as they are stored).

Why not take a GGUF model's weights from transformers: its loader dequantizes every block to fp32,
and the 4-bit graph must serve the blocks themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ragmix.errors import BundleError
from ragmix.models import quant
from ragmix.models.fused_graph import DecoderSpec, Weights

LOG = logging.getLogger(__name__)

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def spec_from_config(config: Any) -> DecoderSpec:
    """The fused graph's architecture numbers from a transformers config (refusing what it lacks)."""
    kind = config.model_type
    if kind == "gpt2":
        activation = config.activation_function
        if activation not in ("gelu_new", "gelu"):
            raise BundleError(
                f"GPT-2 activation {activation!r} is not supported by the fused graph."
            )
        head_dim = config.n_embd // config.n_head
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        scales = None
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            scales = tuple(
                scale / (i + 1 if config.scale_attn_by_inverse_layer_idx else 1)
                for i in range(config.n_layer)
            )
        return DecoderSpec(
            family="gpt2",
            layers=config.n_layer,
            hidden=config.n_embd,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=head_dim,
            intermediate=config.n_inner or 4 * config.n_embd,
            vocab=config.vocab_size,
            max_positions=config.n_positions,
            norm_eps=config.layer_norm_epsilon,
            activation=activation,
            attention_scale=scales,
        )
    if kind not in LLAMA_LIKE:
        raise BundleError(
            f"model_type {kind!r} has no fused graph; supported: llama, mistral, qwen2, gpt2."
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise BundleError(f"activation {config.hidden_act!r} is not supported by the fused graph.")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise BundleError(f"rope scaling {rope_type!r} is not supported by the fused graph yet.")
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    if kind == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return DecoderSpec(
        family="llama",
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        norm_eps=config.rms_norm_eps,
        rope_theta=float(theta),
        sliding_window=int(window) if window else None,
    )


def from_state_dict(spec: DecoderSpec, state: dict[str, np.ndarray], tied: bool) -> Weights:
    """Weights from a transformers state dict (numpy arrays, keys as the model names them)."""
    if spec.family == "gpt2":
        return _gpt2(spec, state)
    p = "model."
    layers = []
    for i in range(spec.layers):
        a = f"{p}layers.{i}."
        layer: dict[str, Any] = {
            "attn_norm": state[a + "input_layernorm.weight"],
            "qkv": np.concatenate([state[a + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            "o": state[a + "self_attn.o_proj.weight"],
            "mlp_norm": state[a + "post_attention_layernorm.weight"],
            "gate_up": np.concatenate([state[a + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]),
            "down": state[a + "mlp.down_proj.weight"],
        }
        if a + "self_attn.q_proj.bias" in state:
            layer["qkv_bias"] = np.concatenate(
                [state[a + f"self_attn.{x}_proj.bias"] for x in "qkv"]
            )
        layers.append(layer)
    head = None if tied else state["lm_head.weight"]
    return Weights(state[p + "embed_tokens.weight"], state[p + "norm.weight"], layers, head)


# GPT-2's per-layer weights: logical name -> (transformers name, stored [in, out] as Conv1D does).
GPT2_LAYER = {
    "attn_norm": ("ln_1.weight", False),
    "attn_norm_bias": ("ln_1.bias", False),
    "qkv": ("attn.c_attn.weight", True),
    "qkv_bias": ("attn.c_attn.bias", False),
    "o": ("attn.c_proj.weight", True),
    "o_bias": ("attn.c_proj.bias", False),
    "mlp_norm": ("ln_2.weight", False),
    "mlp_norm_bias": ("ln_2.bias", False),
    "fc": ("mlp.c_fc.weight", True),
    "fc_bias": ("mlp.c_fc.bias", False),
    "down": ("mlp.c_proj.weight", True),
    "down_bias": ("mlp.c_proj.bias", False),
}
LINEAR = ("qkv", "o", "gate_up", "fc", "down")  # the per-layer weights that are matmuls


def to_state_dict(spec: DecoderSpec, weights: Weights, heads: tuple[int, int]) -> dict:
    """The weights' fp32 values under transformers' names (blocks dequantized): a reference model
    loaded with them computes what the fused graph should. heads: (q rows, k rows) of qkv."""
    state: dict[str, np.ndarray] = {}
    if spec.family == "gpt2":
        for i, layer in enumerate(weights.layers):
            for key in (k for k in LINEAR if k in layer):
                name, _ = GPT2_LAYER[key]
                state[f"transformer.h.{i}.{name}"] = quant.dense(layer[key]).T
        state["transformer.wte.weight"] = quant.dense(weights.embed)
        return state
    q_rows, k_rows = heads
    for i, layer in enumerate(weights.layers):
        a = f"model.layers.{i}."
        qkv = quant.dense(layer["qkv"])
        for name, part in zip("qkv", np.split(qkv, [q_rows, q_rows + k_rows]), strict=True):
            state[a + f"self_attn.{name}_proj.weight"] = part
        state[a + "self_attn.o_proj.weight"] = quant.dense(layer["o"])
        gate, up = np.split(quant.dense(layer["gate_up"]), 2)
        state[a + "mlp.gate_proj.weight"], state[a + "mlp.up_proj.weight"] = gate, up
        state[a + "mlp.down_proj.weight"] = quant.dense(layer["down"])
    state["model.embed_tokens.weight"] = quant.dense(weights.embed)
    if weights.lm_head is not None:
        state["lm_head.weight"] = quant.dense(weights.lm_head)
    return state


def _gpt2(spec: DecoderSpec, state: dict[str, np.ndarray]) -> Weights:
    """GPT-2's Conv1D weights are [in, out]: transposed to [out, in] here."""
    p = "transformer."
    layers = []
    for i in range(spec.layers):
        layer = {}
        for key, (name, transposed) in GPT2_LAYER.items():
            value = state[f"{p}h.{i}.{name}"]
            layer[key] = value.T if transposed else value
        layers.append(layer)
    return Weights(
        state[p + "wte.weight"],
        state[p + "ln_f.weight"],
        layers,
        None,
        pos_embed=state[p + "wpe.weight"],
        final_norm_bias=state[p + "ln_f.bias"],
    )


def from_gguf(spec: DecoderSpec, path: Path) -> Weights:
    """Weights of a llama-family GGUF file, its Q4_1 / Q8_0 blocks unchanged (other quantized
    types are dequantized to fp32 by the gguf package)."""
    import gguf

    if spec.family != "llama":
        raise BundleError(f"{path}: only llama-family GGUF files have a fused graph.")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, permute_heads: int | None = None) -> quant.Weight:
        if name not in tensors:
            raise BundleError(f"{path} lacks tensor {name!r}.")
        w = _read(tensors[name], gguf)
        if permute_heads is not None:
            w = _rows(w, _unpermute_rows(w.shape[0], permute_heads))
        return w

    layers = []
    for i in range(spec.layers):
        b = f"blk.{i}."
        layers.append(
            {
                "attn_norm": quant.dense(get(b + "attn_norm.weight")).reshape(-1),
                "qkv": quant.concat_rows(
                    [
                        get(b + "attn_q.weight", spec.heads),
                        get(b + "attn_k.weight", spec.kv_heads),
                        get(b + "attn_v.weight"),
                    ]
                ),
                "o": get(b + "attn_output.weight"),
                "mlp_norm": quant.dense(get(b + "ffn_norm.weight")).reshape(-1),
                "gate_up": quant.concat_rows(
                    [get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")]
                ),
                "down": get(b + "ffn_down.weight"),
            }
        )
    head = get("output.weight") if "output.weight" in tensors else None
    final = quant.dense(get("output_norm.weight")).reshape(-1)
    return Weights(get("token_embd.weight"), final, layers, head)


def _read(tensor: Any, gguf: Any) -> quant.Weight:
    """One GGUF tensor as fp32 rows [N, K] or its blocks. GGUF lists shapes innermost first."""
    kind = tensor.tensor_type
    shape = [int(x) for x in tensor.shape]
    cols, rows = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if kind == gguf.GGMLQuantizationType.Q4_1:
        return quant.parse_q4_1(tensor.data, rows, cols)
    if kind == gguf.GGMLQuantizationType.Q8_0:
        return quant.parse_q8_0(tensor.data, rows, cols)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data, np.float32).reshape(rows, cols)
    LOG.info("dequantizing %s (%s) to fp32", tensor.name, kind.name)
    return gguf.quants.dequantize(tensor.data, kind).astype(np.float32).reshape(rows, cols)


def _rows(w: quant.Weight, index: np.ndarray) -> quant.Weight:
    return w[index] if isinstance(w, np.ndarray) else w.rows(index)


def _unpermute_rows(n: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's Q/K permutation (convert_hf_to_gguf's `permute`:
    each head's two rotary halves interleaved), giving transformers' rotate-half layout. It moves
    whole rows, so the blocks are untouched."""
    half = n // heads // 2
    # llama.cpp wrote hf.reshape(heads, 2, half).swapaxes(1, 2): gguf row (h, j, s) = hf (h, s, j)
    gguf_rows = np.arange(n).reshape(heads, half, 2)
    return gguf_rows.transpose(0, 2, 1).reshape(-1)  # hf row (h, s, j) is at gguf (h, j, s)

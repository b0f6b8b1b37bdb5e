"""Export an encoder-decoder LM (BART, mBART, T5) to a ragmix generator bundle of two graphs over
the engine's own slot cache ("unified slots").

A row's cache is laid out as a decoder-only row's: 2 * decoder layers buffers k0, v0, k1, ...,
[rows, heads, capacity, head_dim]. For a row whose source has E tokens, slots [0, E) of layer i's
buffers hold decoder layer i's cross-attention keys and values of the encoder's output (written
once, from encoder.onnx), and slots [E, length) its self-attention keys and values. decoder.onnx
reads both from the same buffers under two masks built from `lengths` and `sources`, so the engine
moves, copies, grows and evicts encoder-decoder rows exactly as it does decoder-only ones.

transformers' cache classes and mask builders do not trace (they freeze shapes), so the graphs
are wrapper modules that reuse the model's own submodules and weights (embeddings, norms, q/k/v/o
projections, feed-forward blocks) and do the attention themselves over the padded cache.

Needs the `export` extra (torch, transformers, onnx); the runtime (seq2seq.py) needs none of them.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ragmix.errors import BundleError
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bart", "mbart", "t5")
ARCHITECTURE = "encoder-decoder"
GRAPH = "seq2seq"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
PASSAGE_TEMPLATE = "{title} / {text}"  # HF's RagRetriever: title + title_sep + text
QUESTION_SEP = " // "  # HF's RagRetriever: ... + doc_sep + question
T5_MAX_POSITIONS = 512
"""T5's relative positions set no length limit; this bound (config.n_positions when the config
has one) is what the bundle promises, the length T5 was trained at."""
TOLERANCE = 1e-4
"""The export check's bound on |ONNX - PyTorch| logits, in units of max(1, logits' std)."""


def io_names(num_layers: int) -> dict[str, Any]:
    """Input and output names of both graphs, in graph order."""
    cross = [f"cross.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    new = [f"new.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return {
        "encoder": {"inputs": ["input_ids", "attention_mask"], "outputs": cross},
        "decoder": {
            "inputs": ["input_ids", "lengths", "sources", "logits_index", *past],
            "outputs": ["logits", *new],
        },
    }


def export_seq2seq(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    opset: int = 17,
    name: str | None = None,
    tolerance: float = TOLERANCE,
) -> Path:
    """Export the Hugging Face BART / mBART / T5 folder `src` to the generator bundle `out`.

    The bundle is written as a new version of `out` (bundle.new_version); before it is put in
    force its logits, run through the runtime (fresh rows, continuing rows, both in one pass,
    padding), are checked against the PyTorch model's teacher-forced ones.
    """
    bundle.check_target(out, overwrite)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer
    except ImportError as e:
        raise BundleError(
            "Exporting a generator needs torch and transformers: "
            f"`pip install ragmix[export]` ({e})."
        ) from e
    src = Path(src)
    if not (src / "config.json").is_file():
        raise BundleError(f"{src} has no config.json; it is not a Hugging Face model folder.")
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(src)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BundleError(
            f"{src}: model_type {config.model_type!r} is not an encoder-decoder the export "
            f"supports; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:  # a folder without weights or tokenizer files
        raise BundleError(f"{src}: transformers cannot load it: {e}") from e
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise BundleError(f"{src}: no fast (tokenizers library) tokenizer could be built.")
    LOG.info("loaded %s in %.1f s", src, time.perf_counter() - started)
    encoder, decoder = _wrappers(model)
    manifest = _manifest(model, tokenizer, src, name, opset)
    manifest["vocab_size"] = int(model.get_output_embeddings().weight.shape[0])
    manifest["kv"] = {
        "num_layers": decoder.num_layers,
        "num_kv_heads": decoder.heads,
        "head_dim": decoder.head_dim,
        "dtype": "float32",
        "layout": "unified-slots",
    }
    names = io_names(decoder.num_layers)
    with bundle.new_version(out, overwrite=overwrite) as tmp:
        _export_graph(encoder, _encoder_sample(model), tmp / ENCODER_FILE, names["encoder"], opset)
        sample = _decoder_sample(model, decoder)
        _export_graph(decoder, sample, tmp / DECODER_FILE, names["decoder"], opset)
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
        manifest["io"] = names
        entries = bundle.file_entries(tmp, sorted(p.name for p in tmp.iterdir()))
        manifest["files"] = entries
        manifest["fingerprint"] = bundle.fingerprint(entries)
        bundle.write_manifest(tmp, manifest)
        check(tmp, model, tolerance)
    LOG.info("exported %s to %s in %.1f s", src, out, time.perf_counter() - started)
    return Path(out)


def _manifest(model: Any, tokenizer: Any, src: Path, name: str | None, opset: int) -> dict:
    """Everything but the graphs' own entries: token ids, template, position limits."""
    config, generation = model.config, model.generation_config

    def setting(key: str) -> int | None:  # generation_config first: transformers 5 moved them
        return _first_int(getattr(generation, key, None), getattr(config, key, None))

    t5 = config.model_type == "t5"
    start = setting("decoder_start_token_id")
    if start is None and t5:
        start = config.pad_token_id  # T5 starts the decoder at PAD
    if start is None:
        raise BundleError(f"{src}: the config names no decoder_start_token_id.")
    eos = _eos_token_ids(generation.eos_token_id, config.eos_token_id, tokenizer.eos_token_id)
    pad = _first_int(tokenizer.pad_token_id, setting("pad_token_id"))
    if t5:
        positions = int(getattr(config, "n_positions", None) or T5_MAX_POSITIONS)
    else:
        positions = int(config.max_position_embeddings)  # learned tables, encoder and decoder
    return {
        "format": bundle.FORMAT_VERSION,
        "kind": "generator",
        "name": name or src.name,
        "architecture": ARCHITECTURE,
        "model_type": config.model_type,
        "graph": GRAPH,
        "source": {"folder": src.name},
        "tokenizer": TOKENIZER_FILE,
        "prompt_template": prompt_template(tokenizer, getattr(config, "prefix", None)),
        "passage_template": PASSAGE_TEMPLATE,
        "eos_token_ids": eos,
        "pad_token_id": eos[0] if pad is None else pad,
        "bos_token_id": setting("bos_token_id"),
        "decoder_start_token_id": int(start),
        "forced_bos_token_id": setting("forced_bos_token_id"),
        "forced_eos_token_id": setting("forced_eos_token_id"),
        "max_positions": positions,
        "max_source_positions": positions,
        "opset": opset,
    }


def _first_int(*candidates: Any) -> int | None:
    """The first candidate that is set (a list: its first id), as an int."""
    for value in candidates:
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _eos_token_ids(*candidates: Any) -> list[int]:
    for raw in candidates:
        if raw is not None:
            ids = [raw] if isinstance(raw, int) else list(raw)
            if ids:
                return sorted({int(i) for i in ids})
    raise BundleError("the model names no EOS token (generation_config, config, tokenizer).")


def prompt_template(tokenizer: Any, prefix: str | None = None) -> str:
    """HF's RAG context string as a str.format template with one {passage} before one {question}.

    HF tokenizes prefix + title + " / " + text + " // " + question with the tokenizer's special
    tokens; the runtime encodes without adding any but turns special-token strings in the text
    into their ids, so the tokens the tokenizer adds around a text (BART "<s>" ... "</s>", T5
    ... "</s>") are written into the template literally.
    """
    head, tail = special_affixes(tokenizer.backend_tokenizer)
    return (
        _escape(head + (prefix or "")) + "{passage}" + QUESTION_SEP + "{question}" + _escape(tail)
    )


def _escape(text: str) -> str:
    """Literal text inside a str.format template."""
    return text.replace("{", "{{").replace("}", "}}")


def special_affixes(backend: Any) -> tuple[str, str]:
    """The text of the special tokens the tokenizer adds before and after a text."""
    probe = "hello world"
    with_special = backend.encode(probe, add_special_tokens=True).ids
    without = backend.encode(probe, add_special_tokens=False).ids
    for n in range(len(with_special) - len(without) + 1):
        if with_special[n : n + len(without)] == without:
            head, tail = with_special[:n], with_special[n + len(without) :]
            return _text(backend, head), _text(backend, tail)
    raise BundleError("the tokenizer changes a text's own tokens when it adds special tokens.")


def _text(backend: Any, ids: list[int]) -> str:
    """Special tokens as the text that encodes back to them (joined: no spaces between)."""
    text = "".join(backend.id_to_token(i) for i in ids)
    if backend.encode(text, add_special_tokens=False).ids != ids:
        raise BundleError(f"the special tokens {ids} do not encode back from their text {text!r}.")
    return text


# ------------------------------------------------------------------------------------ graphs


def _wrappers(model: Any) -> tuple[Any, Any]:
    """(encoder graph, decoder graph) modules for the model's family, in eval mode: the exporter
    puts a module back in the mode it found it in, and a new module is in training mode (with
    the model's dropout inside it)."""
    classes = _graph_classes()
    family = "t5" if model.config.model_type == "t5" else "bart"
    return classes[f"{family}_encoder"](model).eval(), classes[f"{family}_decoder"](model).eval()


def _graph_classes() -> dict[str, type]:
    """The wrapper modules, defined on first use so importing this file does not import torch."""
    import torch
    from torch import nn

    neg = torch.finfo(torch.float32).min  # additive mask: finite, and exp() of it is 0

    def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        """batch x tokens x (heads*d) -> batch x heads x tokens x d."""
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """batch x heads x tokens x d -> batch x tokens x (heads*d)."""
        return x.transpose(1, 2).flatten(2)

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, neg)

    def attend(q, k, v, bias, scale: float) -> torch.Tensor:
        """Softmax attention; bias: additive, broadcast to batch x heads x queries x keys."""
        return torch.matmul(torch.softmax(scores(q, k, bias, scale), dim=-1), v)

    def scores(q, k, bias, scale: float) -> torch.Tensor:
        w = torch.matmul(q, k.transpose(2, 3))
        return (w * scale if scale != 1.0 else w) + bias

    def attend_split(q, past, new, bias_past, bias_new, scale: float) -> torch.Tensor:
        """Attention over the cache's past and the pass's new keys without concatenating them
        (a concatenation would copy the whole cache in every layer of every step); the biases
        broadcast to batch x heads x queries x {capacity, new}."""
        (k_past, v_past), (k_new, v_new) = past, new
        w = torch.cat([scores(q, k_past, bias_past, scale), scores(q, k_new, bias_new, scale)], -1)
        p = torch.softmax(w, dim=-1)
        c = k_past.shape[2]
        return torch.matmul(p[..., :c], v_past) + torch.matmul(p[..., c:], v_new)

    def decoder_masks(lengths, sources, capacity_of, width_of):
        """Additive masks of a decoder pass: self-attention over past slots [sources, lengths)
        (batch x 1 x 1 x C) and causal over the new tokens (1 x 1 x D x D); cross-attention over
        slots [0, sources) (batch x 1 x 1 x C)."""
        slots = torch.arange(capacity_of.shape[2])  # C
        lo, hi = sources.unsqueeze(1), lengths.unsqueeze(1)  # batch x 1
        self_past = additive((slots >= lo) & (slots < hi))[:, None, None, :]
        cross = additive(slots < lo)[:, None, None, :]
        j = torch.arange(width_of.shape[1])  # D
        causal = additive(j.unsqueeze(0) <= j.unsqueeze(1))[None, None]  # 1 x 1 x D x D
        return self_past, causal, cross

    def gather_rows(hidden, logits_index):
        """hidden[b, logits_index[b, w]]: batch x W x d (before the LM head: W, not D, rows)."""
        index = logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return torch.gather(hidden, 1, index)

    def past_pairs(past: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]

    # ------------------------------------------------------------------ BART / mBART

    class BartEncoderGraph(nn.Module):
        """input_ids, attention_mask (batch x S) -> every decoder layer's cross keys and values
        of the encoder output (batch x heads x S x head_dim each)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            base = model.get_encoder()
            self.encoder = base
            self.pre_ln = model.config.model_type == "mbart"
            self.heads = int(model.config.encoder_attention_heads)
            self.cross = nn.ModuleList(layer.encoder_attn for layer in model.get_decoder().layers)
            self.dec_heads = int(model.config.decoder_attention_heads)

        def forward(self, input_ids, attention_mask):
            enc = self.encoder
            positions = torch.arange(input_ids.shape[1]) + enc.embed_positions.offset  # S
            h = enc.embed_tokens(input_ids) + enc.embed_positions.weight[positions]
            h = enc.layernorm_embedding(h)
            bias = additive(attention_mask.bool())[:, None, None, :]  # batch x 1 x 1 x S
            for layer in enc.layers:
                h = self._layer(layer, h, bias)
            if self.pre_ln:
                h = enc.layer_norm(h)
            out = []
            for attn in self.cross:
                out += [split_heads(attn.k_proj(h), self.dec_heads)]
                out += [split_heads(attn.v_proj(h), self.dec_heads)]
            return tuple(out)

        def _layer(self, layer, h, bias):
            def self_attention(x):
                a = layer.self_attn
                q, k, v = (split_heads(p(x), self.heads) for p in (a.q_proj, a.k_proj, a.v_proj))
                return a.out_proj(merge_heads(attend(q, k, v, bias, a.scaling)))

            def ffn(x):
                return layer.fc2(layer.activation_fn(layer.fc1(x)))

            if self.pre_ln:
                h = h + self_attention(layer.self_attn_layer_norm(h))
                return h + ffn(layer.final_layer_norm(h))
            h = layer.self_attn_layer_norm(h + self_attention(h))
            return layer.final_layer_norm(h + ffn(h))

    class BartDecoderGraph(nn.Module):
        """One decoder pass over the slot cache (module docstring): logits at logits_index and
        the new tokens' self-attention keys and values."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.decoder = model.get_decoder()
            self.pre_ln = model.config.model_type == "mbart"
            self.heads = int(model.config.decoder_attention_heads)
            self.head_dim = int(model.config.d_model) // self.heads
            self.num_layers = len(self.decoder.layers)
            self.max_positions = int(model.config.max_position_embeddings)
            self.lm_head = model.get_output_embeddings()
            self.register_buffer("final_logits_bias", model.final_logits_bias.detach().clone())

        def forward(self, input_ids, lengths, sources, logits_index, *past):
            dec = self.decoder
            d = input_ids.shape[1]
            positions = (lengths - sources).unsqueeze(1) + torch.arange(d)  # batch x D
            # Padding past the table (a row shorter than the pass) reads its last entry.
            positions = positions.clamp(0, self.max_positions - 1) + dec.embed_positions.offset
            h = dec.embed_tokens(input_ids) + dec.embed_positions.weight[positions]
            h = dec.layernorm_embedding(h)
            masks = decoder_masks(lengths, sources, past[0], input_ids)
            new: list[torch.Tensor] = []
            for layer, kv in zip(dec.layers, past_pairs(past), strict=True):
                h, k, v = self._layer(layer, h, kv, masks)
                new += [k, v]
            if self.pre_ln:
                h = dec.layer_norm(h)
            logits = self.lm_head(gather_rows(h, logits_index)) + self.final_logits_bias
            return (logits, *new)

        def _layer(self, layer, h, kv, masks):
            self_past, causal, cross = masks
            fresh: list[torch.Tensor] = []

            def self_attention(x):
                a = layer.self_attn
                q, k, v = (split_heads(p(x), self.heads) for p in (a.q_proj, a.k_proj, a.v_proj))
                fresh.extend((k, v))
                out = attend_split(q, kv, (k, v), self_past, causal, a.scaling)
                return a.out_proj(merge_heads(out))

            def cross_attention(x):
                a = layer.encoder_attn
                q = split_heads(a.q_proj(x), self.heads)
                return a.out_proj(merge_heads(attend(q, kv[0], kv[1], cross, a.scaling)))

            def ffn(x):
                return layer.fc2(layer.activation_fn(layer.fc1(x)))

            if self.pre_ln:
                h = h + self_attention(layer.self_attn_layer_norm(h))
                h = h + cross_attention(layer.encoder_attn_layer_norm(h))
                h = h + ffn(layer.final_layer_norm(h))
            else:
                h = layer.self_attn_layer_norm(h + self_attention(h))
                h = layer.encoder_attn_layer_norm(h + cross_attention(h))
                h = layer.final_layer_norm(h + ffn(h))
            return h, fresh[0], fresh[1]

    # ------------------------------------------------------------------ T5

    def bucket_table(attention: Any, bidirectional: bool) -> torch.Tensor:
        """T5's bucket of every relative position in [-max_distance, max_distance], computed once
        by transformers' own function: beyond that range the bucket no longer changes, and a
        table lookup in the graph cannot round a logarithm differently from PyTorch."""
        reach = int(attention.relative_attention_max_distance)
        relative = torch.arange(-reach, reach + 1)
        return attention._relative_position_bucket(
            relative,
            bidirectional=bidirectional,
            num_buckets=attention.relative_attention_num_buckets,
            max_distance=reach,
        )

    class RelativeBias(nn.Module):
        """T5's position bias (layer 0's table, shared by every layer) for relative positions."""

        def __init__(self, attention: Any, bidirectional: bool) -> None:
            super().__init__()
            self.embedding = attention.relative_attention_bias  # buckets x heads
            self.reach = int(attention.relative_attention_max_distance)
            self.register_buffer("buckets", bucket_table(attention, bidirectional))

        def forward(self, relative: torch.Tensor) -> torch.Tensor:
            """relative (key - query position): ... x Q x K -> ... x heads x Q x K."""
            index = relative.clamp(-self.reach, self.reach) + self.reach
            bias = self.embedding(self.buckets[index])  # ... x Q x K x heads
            n = bias.dim()  # (movedim's negative perm does not export)
            return bias.permute(*range(n - 3), n - 1, n - 3, n - 2)

    class T5EncoderGraph(nn.Module):
        """As BartEncoderGraph, for T5 (RMS norms, relative position bias, no scaling)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.encoder = model.get_encoder()
            first = self.encoder.block[0].layer[0].SelfAttention
            self.position_bias = RelativeBias(first, bidirectional=True)
            self.cross = nn.ModuleList(
                block.layer[1].EncDecAttention for block in model.get_decoder().block
            )

        def forward(self, input_ids, attention_mask):
            enc = self.encoder
            h = enc.embed_tokens(input_ids)
            i = torch.arange(input_ids.shape[1])  # S
            bias = self.position_bias(i.unsqueeze(0) - i.unsqueeze(1)).unsqueeze(0)  # 1xHxSxS
            bias = bias + additive(attention_mask.bool())[:, None, None, :]  # batch x H x S x S
            for block in enc.block:
                sa = block.layer[0]
                x = sa.layer_norm(h)
                a = sa.SelfAttention
                q, k, v = (split_heads(p(x), a.n_heads) for p in (a.q, a.k, a.v))
                h = h + a.o(merge_heads(attend(q, k, v, bias, 1.0)))
                h = block.layer[1](h)  # T5LayerFF: norm, (gated) dense, residual
            h = enc.final_layer_norm(h)
            out = []
            for attn in self.cross:
                out += [split_heads(attn.k(h), attn.n_heads), split_heads(attn.v(h), attn.n_heads)]
            return tuple(out)

    class T5DecoderGraph(nn.Module):
        """As BartDecoderGraph, for T5: causal relative position bias on the self-attention,
        from positions slot - sources; none on the cross-attention."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.decoder = model.get_decoder()
            first = self.decoder.block[0].layer[0].SelfAttention
            self.position_bias = RelativeBias(first, bidirectional=False)
            self.heads = int(first.n_heads)
            self.head_dim = int(first.key_value_proj_dim)
            self.num_layers = len(self.decoder.block)
            config = model.config
            scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
            self.output_scale = float(config.d_model) ** -0.5 if scaled else 1.0
            self.lm_head = model.get_output_embeddings()

        def forward(self, input_ids, lengths, sources, logits_index, *past):
            dec = self.decoder
            d, c = input_ids.shape[1], past[0].shape[2]
            h = dec.embed_tokens(input_ids)
            self_past, causal, cross = decoder_masks(lengths, sources, past[0], input_ids)
            start = (lengths - sources).unsqueeze(1)  # batch x 1: the first new token's position
            query = start + torch.arange(d)  # batch x D
            key_past = torch.arange(c) - sources.unsqueeze(1)  # batch x C
            bias_past = self.position_bias(key_past.unsqueeze(1) - query.unsqueeze(2))
            j = torch.arange(d)
            bias_new = self.position_bias(j.unsqueeze(0) - j.unsqueeze(1)).unsqueeze(0)
            bias_past = bias_past + self_past  # batch x H x D x C
            bias_new = bias_new + causal  # 1 x H x D x D
            new: list[torch.Tensor] = []
            for block, kv in zip(dec.block, past_pairs(past), strict=True):
                sa, ca = block.layer[0], block.layer[1]
                x = sa.layer_norm(h)
                a = sa.SelfAttention
                q, k, v = (split_heads(p(x), a.n_heads) for p in (a.q, a.k, a.v))
                new += [k, v]
                out = attend_split(q, kv, (k, v), bias_past, bias_new, 1.0)
                h = h + a.o(merge_heads(out))
                x = ca.layer_norm(h)
                a = ca.EncDecAttention
                q = split_heads(a.q(x), a.n_heads)
                h = h + a.o(merge_heads(attend(q, kv[0], kv[1], cross, 1.0)))
                h = block.layer[2](h)
            h = dec.final_layer_norm(h)
            picked = gather_rows(h, logits_index)
            if self.output_scale != 1.0:
                picked = picked * self.output_scale
            return (self.lm_head(picked), *new)

    return {
        "bart_encoder": BartEncoderGraph,
        "bart_decoder": BartDecoderGraph,
        "t5_encoder": T5EncoderGraph,
        "t5_decoder": T5DecoderGraph,
    }


def _encoder_sample(model: Any) -> tuple[Any, ...]:
    """Two rows of 5 source tokens, the second padded after 3."""
    import torch

    ids = torch.randint(
        4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


def _decoder_sample(model: Any, decoder: Any) -> tuple[Any, ...]:
    """Two rows, 3 new tokens, 2 logits positions, a cache of 9 slots (dims all distinct, so no
    traced shape can stand for another)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (2, 3), generator=gen)
    lengths, sources = torch.tensor([6, 4]), torch.tensor([4, 4])
    logits_index = torch.tensor([[0, 2], [1, 2]])
    shape = (2, decoder.heads, 9, decoder.head_dim)
    past = [torch.randn(shape, generator=gen) for _ in range(2 * decoder.num_layers)]
    return (ids, lengths, sources, logits_index, *past)


def _export_graph(
    module: Any, sample: tuple[Any, ...], path: Path, names: dict[str, list[str]], opset: int
) -> None:
    """torch.onnx's legacy exporter with every batch, length and capacity axis dynamic."""
    import torch

    from ragmix.models.generator_export import _consolidate_external_data

    inputs, outputs = names["inputs"], names["outputs"]
    axes: dict[str, dict[int, str]]
    if inputs[0:2] == ["input_ids", "attention_mask"]:  # the encoder
        axes = {n: {0: "batch", 1: "source"} for n in inputs}
        axes.update({n: {0: "batch", 2: "source"} for n in outputs})
    else:
        axes = {
            "input_ids": {0: "batch", 1: "new"},
            "lengths": {0: "batch"},
            "sources": {0: "batch"},
            "logits_index": {0: "batch", 1: "positions"},
            "logits": {0: "batch", 1: "positions"},
        }
        axes.update({n: {0: "batch", 2: "capacity"} for n in inputs[4:]})
        axes.update({n: {0: "batch", 2: "new"} for n in outputs[1:]})
    started = time.perf_counter()
    # A folder of its own: the consolidation takes every other file beside the graph for its
    # external data.
    alone = path.parent / f".{path.stem}"
    alone.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            sample,
            str(alone / path.name),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _consolidate_external_data(alone / path.name)
    for file in alone.iterdir():  # the graph, and its .data beside it when over 2 GB
        file.rename(path.parent / file.name)
    alone.rmdir()
    LOG.info("traced %s in %.1f s", path.name, time.perf_counter() - started)


# ------------------------------------------------------------------------------------ check


CHECK_SOURCES = (20, 3, 4)  # row 0 past 16 tokens: T5's logarithmic buckets start at 8 and 16
CHECK_ANSWER = 12  # decoder tokens a row, the start token included


def check(folder: Path, model: Any, tolerance: float = TOLERANCE) -> None:
    """Refuse a bundle whose graphs, run through the runtime, disagree with PyTorch: two fresh
    rows of different source lengths (padded), then both continuing by ten tokens in one pass
    with a third row starting fresh, each against the model's teacher-forced logits."""
    import torch

    from ragmix.models.seq2seq import Seq2SeqGenerator

    runner = Seq2SeqGenerator.load(folder, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    vocab = runner.vocab_size
    sources = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in CHECK_SOURCES]
    start = [runner.decoder_start_token_id]
    answers = [
        start + torch.randint(0, vocab, (CHECK_ANSWER - 1,), generator=gen).tolist()
        for _ in sources
    ]
    want = []
    with torch.no_grad():
        for src, ans in zip(sources, answers, strict=True):
            out = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([ans]))
            want.append(out.logits[0].numpy())  # answer x vocab
    e = np.array([len(s) for s in sources])
    cache = runner.new_cache(3, int(e.max()) + CHECK_ANSWER + 4)
    # Pass 1: rows 0 and 1 fresh, their source and first two answer tokens.
    rows = [sources[i] + answers[i][:2] for i in (0, 1)]
    index = e[:2, None] + np.arange(2)
    got = runner.forward(
        _padded(rows, runner.pad_token_id),
        np.zeros(2, np.int64),
        index,
        [b[:2] for b in cache],
        e[:2],
    )
    for i in (0, 1):
        _close(f"row {i}'s fresh logits", got[i], want[i][:2], tolerance)
    # Pass 2: rows 0 and 1 continue with the rest; row 2 starts fresh with three answer tokens.
    more = CHECK_ANSWER - 2
    rows = [answers[0][2:], answers[1][2:], sources[2] + answers[2][:3]]
    index = np.stack([np.arange(more), np.arange(more), e[2] + np.minimum(np.arange(more), 2)])
    got = runner.forward(
        _padded(rows, runner.pad_token_id), np.array([*(e[:2] + 2), 0]), index, cache, e
    )
    for i in (0, 1):
        _close(f"row {i}'s continued logits", got[i], want[i][2:], tolerance)
    _close("a fresh row's logits beside continuing ones", got[2][:3], want[2][:3], tolerance)


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    ids = np.full((len(rows), max(map(len, rows))), pad, np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    return ids


def _close(what: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
    """|got - want| within tolerance x max(1, std(want)), plus 1e-6 relative (a large negative
    bias such as a banned token's is exact only to its own float32 spacing)."""
    scale = max(1.0, float(np.std(want)))
    excess = np.abs(got - want) - 1e-6 * np.abs(want)
    worst = float(excess.max()) / scale
    if not math.isfinite(worst) or worst > tolerance:
        raise BundleError(
            f"the exported graphs' {what} differ from PyTorch by {worst:.2e} (x max(1, std)); "
            f"the bound is {tolerance:.0e}."
        )

"""Export a decoder-only causal LM (Llama / GPT-2 / Qwen2 families) to a ragmix generator bundle.

The ONNX graph is built around what the engine needs and transformers' own graph does not give:
the caller owns the KV cache as flat tensors, gives position ids and a 2-D mask with arbitrary holes
(left padding, evicted slots in the middle of the past), and asks for logits only at chosen positions
so a 5 x 300 prefill never materialises 5 x 300 x vocab floats.

Needs the `export` extra (torch, transformers, onnx; gguf + accelerate for GGUF sources). The
runtime (`generator.py`) needs none of these.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ragmix.errors import BundleError
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "qwen2", "mistral")
ONNX_FILE = "model.onnx"
CHUNK_FILE = "chunk.onnx"  # the fused graph's twin for chunks that continue pasts in several rows
TOKENIZER_FILE = "tokenizer.json"

PASSAGE_MARKER = "RAGMIXPASSAGEMARKER"
QUESTION_MARKER = "RAGMIXQUESTIONMARKER"
# The user turn of a chat model. Passage first so its prefix (and its KV cache) is shared by every
# question asked about it; the instruction goes before the passage, inside that cached prefix, so a
# warm request computes only the question (17 tokens a row for SmolLM2 instead of 29). Tried on
# SmolLM2-135M-Instruct against the default index: this wording gave short, correct answers to 5 of
# 5 questions; the instruction after the question 4 of 5 (it looped on "define a class"); between
# passage and question it echoed the passage or invented "Le Grand Paris".
CHAT_USER_CONTENT = (
    f"Answer in one short sentence, using this text:\n{PASSAGE_MARKER}\n\n"
    f"Question: {QUESTION_MARKER}"
)
PLAIN_TEMPLATE = "{passage}\n\nQuestion: {question}\nAnswer:"


# The graph returns the keys and values of the new tokens only ("new"), not past + new: the caller
# writes them into its own KV buffer in place, so a decode step never copies the whole cache.
KV_OUTPUTS = "new"


def io_names(num_layers: int) -> dict[str, Any]:
    """Input and output names of the exported graph, in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    new = [f"new.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return {
        "inputs": ["input_ids", "attention_mask", "position_ids", "logits_index", *past],
        "outputs": ["logits", *new],
    }


GRAPHS = ("fused", "traced")
# The default for GGUF sources: the fastest precision whose greedy tokens match the exact q4 graph's
# on >= 99 % of the e2e questions' answer tokens (benchmarks/step.py measures both).
DEFAULT_GGUF_PRECISION = "q4"


def export_generator(
    src: Path,
    out: Path,
    *,
    gguf_file: str | None = None,
    overwrite: bool = False,
    opset: int = 17,
    name: str | None = None,
    graph: str = "fused",
    precision: str | None = None,
    quantize: str | None = None,
) -> Path:
    """Export the Hugging Face causal LM folder `src` (or its `gguf_file`) to the bundle `out`.

    graph: "fused" (what the server runs: fused_graph.py) or "traced" (the torch.onnx trace of
    earlier versions, kept as a benchmark baseline; the server does not load it). precision: for
    the fused graph, one of fused_graph.PRECISIONS (default: DEFAULT_GGUF_PRECISION for a GGUF's
    4-bit blocks, fp32 otherwise); quantize="int4" gives an fp32 model Q4_1 blocks first (lossy).
    The bundle is written as a new version of `out` (bundle.new_version) and its logits and new
    keys/values are checked against PyTorch on padded rows with a past before it is put in force.
    """
    bundle.check_target(out, overwrite)
    if graph not in GRAPHS:
        raise BundleError(f"graph must be one of {GRAPHS}, got {graph!r}.")
    if quantize not in (None, "int4"):
        raise BundleError(f"quantize must be 'int4' or none, got {quantize!r}.")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise BundleError(
            f"Exporting a generator needs torch and transformers: `pip install ragmix[export]` ({e})."
        ) from e

    src = Path(src)
    if not src.is_dir():
        raise BundleError(f"{src} is not a folder; give a Hugging Face model folder.")
    if gguf_file is not None and not (src / gguf_file).is_file():
        raise BundleError(f"{src / gguf_file} does not exist.")
    if gguf_file is None and not (src / "config.json").is_file():
        raise BundleError(f"{src} has no config.json; it is not a Hugging Face model folder.")

    started = time.perf_counter()
    load_kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(src, **load_kw)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BundleError(
            f"{src}: model_type {config.model_type!r} is not supported by the generator export; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    tokenizer = AutoTokenizer.from_pretrained(src, **load_kw)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise BundleError(f"{src}: no fast (tokenizers library) tokenizer could be built.")
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation=_attention_for(config), **load_kw
    )
    model.eval()
    LOG.info("loaded %s in %.1f s", src, time.perf_counter() - started)
    wrapper = _wrapper_class()(model)
    eos = _eos_token_ids(model, tokenizer)
    manifest: dict[str, Any] = {
        "format": bundle.FORMAT_VERSION,
        "kind": "generator",
        "name": name or (Path(gguf_file).stem if gguf_file else src.name),
        "architecture": config.model_type,
        "source": {"folder": src.name, "gguf_file": gguf_file},
        "tokenizer": TOKENIZER_FILE,
        "prompt_template": prompt_template(tokenizer),
        "eos_token_ids": eos,
        "pad_token_id": _pad_token_id(model, tokenizer, eos),
        "bos_token_id": _optional_int(config.bos_token_id),
        "max_positions": int(config.max_position_embeddings),
        "opset": opset,
    }
    with bundle.new_version(out, overwrite=overwrite) as tmp:
        tolerance = None
        if graph == "fused":
            weights_from = (src / gguf_file) if gguf_file else None
            tolerance = _export_fused(
                model, config, weights_from, tmp, manifest, precision, quantize
            )
        else:
            _export_traced(wrapper, config, tokenizer, tmp, manifest, opset)
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
        files = sorted(p.name for p in tmp.iterdir())
        entries = bundle.file_entries(tmp, files)
        manifest["files"] = entries
        manifest["fingerprint"] = bundle.fingerprint(entries)
        bundle.write_manifest(tmp, manifest)
        if tolerance is not None:
            _check_fused(tmp, wrapper, tolerance)
    LOG.info("exported %s to %s in %.1f s", src, out, time.perf_counter() - started)
    return Path(out)


def _export_fused(
    model: Any,
    config: Any,
    gguf_path: Path | None,
    tmp: Path,
    manifest: dict[str, Any],
    precision: str | None,
    quantize: str | None,
) -> float:
    """Build the fused graph and its chunk twin from the checkpoint's own weights; returns the
    relative error the check against PyTorch allows them (`_check_fused`, once the bundle is
    complete)."""
    from ragmix.models import checkpoint, fused_graph

    spec = checkpoint.spec_from_config(config)
    if gguf_path is not None and spec.family == "llama":
        weights = checkpoint.from_gguf(spec, gguf_path)
    else:
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        tied = bool(getattr(config, "tie_word_embeddings", False)) or spec.family == "gpt2"
        weights = checkpoint.from_state_dict(spec, state, tied)
    if quantize == "int4":
        weights = _quantize_int4(weights)
        _load_reference(model, spec, weights)  # the check compares against what was quantized
    blocks = _has_blocks(weights)
    if precision is None:
        precision = DEFAULT_GGUF_PRECISION if blocks else "fp32"
    if precision not in fused_graph.PRECISIONS:
        raise BundleError(f"precision must be one of {fused_graph.PRECISIONS}, got {precision!r}.")
    if precision != "fp32" and not blocks:
        raise BundleError(
            f"precision {precision} serves 4-bit blocks, and these weights are fp32: export a "
            "GGUF file, or add --quantize int4 (lossy)."
        )
    started = time.perf_counter()
    for attention, file in (("gqa", ONNX_FILE), ("grouped", CHUNK_FILE)):
        proto = fused_graph.build(spec, weights, precision, attention)
        _save(proto, tmp / file)
        LOG.info(
            "built the fused %s graph, %s attention (%d nodes) in %.1f s",
            precision,
            attention,
            len(proto.graph.node),
            time.perf_counter() - started,
        )
        del proto
    names = fused_graph.io_names(spec.layers)
    manifest.update(
        graph="fused",
        precision=precision,
        quantized=quantize,
        vocab_size=spec.vocab,
        kv={
            "num_layers": spec.layers,
            "num_kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "dtype": "float32",
            "layout": "slots",
        },
        io=names,
        chunk_graph={"file": CHUNK_FILE, "io": fused_graph.io_names(spec.layers, "grouped")},
    )
    # q4 computes the blocks exactly (fp32 accumulation): as tight as fp32 (after --quantize the
    # reference holds the quantized values). Int8 activations (q4-a8) move logits by percents:
    # the check then only catches a wrong layout, which moves them by 100 %.
    return 1e-3 if precision != "q4-a8" else 0.35


def _quantize_int4(weights: Any) -> Any:
    """Q4_1 blocks for every linear weight (an untied LM head too) and Q8_0 for the embedding,
    the layout of llama.cpp's Q4_1 files (round to nearest: lossy)."""
    from ragmix.models import quant
    from ragmix.models.checkpoint import LINEAR

    for layer in weights.layers:
        for key in LINEAR:
            if key in layer:
                layer[key] = quant.quantize_q4_1(quant.dense(layer[key]))
    weights.embed = quant.quantize_q8_0(quant.dense(weights.embed))
    if weights.lm_head is not None:
        weights.lm_head = quant.quantize_q4_1(quant.dense(weights.lm_head))
    return weights


def _load_reference(model: Any, spec: Any, weights: Any) -> None:
    """Put the quantized weights' values into the PyTorch model (the export check's reference)."""
    import torch

    from ragmix.models import checkpoint

    heads = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim)
    state = checkpoint.to_state_dict(spec, weights, heads)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def _has_blocks(weights: Any) -> bool:
    from ragmix.models import quant

    return any(isinstance(w, quant.Q4_1) for layer in weights.layers for w in layer.values())


def _save(proto: Any, path: Path) -> None:
    """One .onnx file, its weights beside it in <name>.data when they pass protobuf's 2 GB."""
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size < 1_800_000_000:
        import onnx

        onnx.save_model(proto, str(path))
        return
    _save_external(proto, path)


def _save_external(proto: Any, path: Path) -> None:
    """The model at `path` with all its weights in one file `path.name + ".data"` (a bundle lists
    and checksums its files; two graphs in one folder get a data file each)."""
    import onnx

    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _check_fused(folder: Path, wrapper: Any, tolerance: float) -> None:
    """Refuse a bundle whose fused graphs disagree with PyTorch, run through the runtime itself:
    a prompt batch with padding, a decode batch over pasts of different lengths, one row
    continuing a past by a chunk (GroupQueryAttention) and two rows doing so (the chunk graph)."""
    import torch

    from ragmix.models.generator import Generator

    runner = Generator.load(folder, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    cases = [([0, 0], [4, 2]), ([3, 1], [1, 1]), ([5], [3]), ([5, 2], [3, 2])]
    for lengths, counts in cases:
        b, s = len(lengths), max(counts)
        ids = torch.randint(0, runner.vocab_size, (b, s), generator=gen)
        cap = max(lengths) + s
        past = [
            torch.randn(b, runner.num_kv_heads, cap, runner.head_dim, generator=gen)
            for _ in range(2 * runner.num_layers)
        ]
        index = torch.tensor([[n - 1, 0] for n in counts])  # b x 2
        cache = [p.numpy().copy() for p in past]
        got = runner.forward(ids.numpy(), np.array(lengths), index.numpy(), cache)
        p_len = max(lengths)
        mask = torch.zeros(b, p_len + s, dtype=torch.int64)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        mask[:, p_len:] = 1
        positions = torch.tensor([[n + j for j in range(s)] for n in lengths])
        with torch.no_grad():
            out = wrapper(ids, mask, positions, index, *(p[:, :, :p_len] for p in past))
        _close("logits", got, out[0].numpy(), tolerance)
        for layer, (fused, ref) in enumerate(zip(cache, out[1:], strict=True)):
            for i, (n, c) in enumerate(zip(lengths, counts, strict=True)):
                _close(f"new KV {layer}", fused[i, :, n : n + c], ref[i, :, :c].numpy(), tolerance)


def _close(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    rel = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
    if not np.isfinite(rel) or rel > tolerance:
        raise BundleError(
            f"the fused graph's {what} differs from PyTorch: relative error {rel:.2e}."
        )


def _export_traced(
    wrapper: Any, config: Any, tokenizer: Any, tmp: Path, manifest: dict[str, Any], opset: int
) -> None:
    """The earlier torch.onnx trace (mask-based attention), kept as a benchmark baseline."""
    import torch

    sample = _sample_inputs(wrapper.num_layers, config, tokenizer)
    with torch.no_grad():
        expected = wrapper(*sample)
    names = io_names(wrapper.num_layers)
    onnx_path = tmp / ONNX_FILE
    _export_onnx(wrapper, sample, onnx_path, names, opset)
    _check_onnx(onnx_path, sample, expected, names)
    manifest.update(
        graph="traced",
        vocab_size=int(expected[0].shape[-1]),
        kv={
            "num_layers": wrapper.num_layers,
            "num_kv_heads": int(expected[1].shape[1]),
            "head_dim": int(expected[1].shape[3]),
            "dtype": "float32",
            "outputs": KV_OUTPUTS,
        },
        io=names,
    )


def prompt_template(tokenizer: Any) -> str:
    """A str.format template with one {passage} before one {question}, from the chat template.

    Rendering a user turn that holds marker strings keeps every special token and system prompt the
    model was trained with; braces of the rendered text are escaped so str.format leaves them be.
    """
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_USER_CONTENT}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prefix = ""
    else:
        rendered = PLAIN_TEMPLATE.replace("{passage}", PASSAGE_MARKER).replace(
            "{question}", QUESTION_MARKER
        )
        prefix = _auto_prefix(tokenizer)
    if rendered.count(PASSAGE_MARKER) != 1 or rendered.count(QUESTION_MARKER) != 1:
        raise BundleError("the chat template does not render the user message exactly once.")
    template = (prefix + rendered).replace("{", "{{").replace("}", "}}")
    template = template.replace(PASSAGE_MARKER, "{passage}").replace(QUESTION_MARKER, "{question}")
    if template.index("{passage}") > template.index("{question}"):
        raise BundleError("the chat template puts the question before the passage.")
    return template


def _auto_prefix(tokenizer: Any) -> str:
    """Text of the tokens (BOS) the tokenizer itself would prepend; the runtime encodes without them."""
    backend = tokenizer.backend_tokenizer
    with_special = backend.encode("hello", add_special_tokens=True).ids
    without = backend.encode("hello", add_special_tokens=False).ids
    n = len(with_special) - len(without)
    if n <= 0 or with_special[n:] != without:
        return ""
    return backend.decode(with_special[:n], skip_special_tokens=False)


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-answer ids from the generation config (the GGUF tokenizer's own EOS can be wrong)."""
    raw = getattr(model.generation_config, "eos_token_id", None)
    if raw is None:
        raw = model.config.eos_token_id
    if raw is None:
        raw = tokenizer.eos_token_id
    ids = [raw] if isinstance(raw, int) else list(raw or [])
    if not ids:
        raise BundleError("the model names no EOS token (generation_config, config, tokenizer).")
    return sorted({int(i) for i in ids})


def _pad_token_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return eos[0]


def _optional_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _sample_inputs(num_layers: int, config: Any, tokenizer: Any) -> tuple[Any, ...]:
    """A batch that exercises every path the graph must keep dynamic: 2 rows, a past of 3 with a
    hole in the middle of row 1, left padding in row 0, and 2 logits positions."""
    import torch

    batch, new, past_len = 2, 4, 3
    ids = tokenizer.backend_tokenizer.encode(
        "The quick brown fox jumps over the lazy dog", add_special_tokens=False
    ).ids
    input_ids = torch.tensor([ids[:new], ids[new : 2 * new]], dtype=torch.int64)  # batch x new
    attention_mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.int64
    )  # batch x (past + new)
    position_ids = torch.from_numpy(_positions(attention_mask.numpy(), new))  # batch x new
    logits_index = torch.tensor([[1, 3], [0, 3]], dtype=torch.int64)  # batch x 2
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    past = [
        torch.randn(batch, heads, past_len, head_dim, generator=gen)
        for _ in range(2 * num_layers)  # batch x kv_heads x past x head_dim
    ]
    return (input_ids, attention_mask, position_ids, logits_index, *past)


def _positions(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, -new_tokens:]


def _export_onnx(
    wrapper: Any, sample: tuple[Any, ...], path: Path, names: dict[str, Any], opset: int
) -> None:
    import torch

    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits_index": {0: "batch", 1: "positions"},
        "logits": {0: "batch", 1: "positions"},
    }
    for n in names["inputs"][4:]:
        dynamic_axes[n] = {0: "batch", 2: "past"}
    for n in names["outputs"][1:]:
        dynamic_axes[n] = {0: "batch", 2: "new"}
    started = time.perf_counter()
    # The tracer warns about every Python-level shape check in transformers; the ORT check after
    # export (_check_onnx) is what tells a frozen shape, on inputs unlike the traced ones.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapper,
            sample,
            str(path),
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _consolidate_external_data(path)
    LOG.info("traced to ONNX in %.1f s", time.perf_counter() - started)


def _consolidate_external_data(path: Path) -> None:
    """Leave one model.onnx, plus one model.onnx.data only when the weights pass 2 GB.

    The legacy exporter writes one external file per tensor for large models; a bundle lists and
    checksums its files, so they are gathered into one.
    """
    import onnx

    folder = path.parent
    extra = [p for p in folder.iterdir() if p != path]
    if not extra:
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in extra:
        p.unlink()
    _save_external(model, path)


def _check_onnx(
    path: Path, sample: tuple[Any, ...], expected: tuple[Any, ...], names: dict[str, Any]
) -> None:
    """Refuse to write a bundle whose graph disagrees with PyTorch (a frozen shape, a lost mask)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(names["inputs"], sample, strict=True)}
    got = session.run(None, feeds)
    for n, g, e in zip(names["outputs"], got, expected, strict=True):
        e = e.numpy()
        if g.shape != e.shape:
            raise BundleError(f"exported {n} has shape {g.shape}, PyTorch gives {e.shape}.")
        rel = float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12))
        if rel > 1e-3:
            raise BundleError(f"exported {n} differs from PyTorch: relative error {rel:.2e}.")


GROUPED_ATTENTION = "ragmix_grouped"


def _attention_for(config: Any) -> str:
    """Our attention for every family: grouped query heads, past and new keys kept apart.

    transformers' eager attention expands each KV head to its query heads (repeat_kv) and attends
    over past + new concatenated; traced into ONNX both copy the whole KV cache at every decode step
    (they were 40 % of an 80-row step). Here each KV head is read once, in place, and the graph
    returns only the new keys and values (the cache passed in `_SplitCache` hands the attention the
    past and the new part separately).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, _split_attention)
    return GROUPED_ATTENTION


def _split_attention(
    module: Any,
    query: Any,  # batch x heads x new x head_dim
    key: Any,  # (past, new): batch x kv_heads x {past, new} x head_dim
    value: Any,  # (past, new), as key
    attention_mask: Any,  # batch x 1 x new x (past + new), additive
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch

    (k_past, k_new), (v_past, v_new) = key, value
    b, h, s, d = query.shape
    kvh = k_new.shape[1]
    g = h // kvh  # query heads per KV head; head i uses KV head i // g, as repeat_kv does
    if scaling is None:  # GPT-2 passes none: its own rules
        scaling = d**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(module.layer_idx + 1)
    q = query.reshape(b, kvh, g * s, d)  # batch x kv_heads x (groups*new) x head_dim
    w = torch.cat(
        [torch.matmul(q, k_past.transpose(2, 3)), torch.matmul(q, k_new.transpose(2, 3))], dim=-1
    )  # batch x kv_heads x (groups*new) x (past+new): scores only, the keys are not copied
    w = w * scaling
    if attention_mask is not None:
        t = w.shape[-1]
        w = w.reshape(b, kvh, g, s, t) + attention_mask[:, :, None, :, :t]  # broadcast groups
        w = w.reshape(b, kvh, g * s, t)
    p = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    past_len = k_past.shape[2]
    out = torch.matmul(p[..., :past_len], v_past) + torch.matmul(p[..., past_len:], v_new)
    return out.reshape(b, h, s, d).transpose(1, 2).contiguous(), None  # batch x new x heads x hd


def _wrapper_class() -> type:
    """The wrapper module, defined on first use so importing this file does not import torch."""
    import torch
    from transformers import DynamicCache

    class _SplitCache(DynamicCache):
        """Hands the attention (past, new) per layer instead of their concatenation, and keeps the
        new keys and values as the graph's outputs."""

        def __init__(self, past: list[tuple[Any, Any]]) -> None:
            super().__init__(ddp_cache_data=past)
            self.past = past
            self.new: list[tuple[Any, Any] | None] = [None] * len(past)

        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kw: Any):
            self.new[layer_idx] = (key_states, value_states)
            k_past, v_past = self.past[layer_idx]
            return (k_past, key_states), (v_past, value_states)

    class CausalLMWithCache(torch.nn.Module):
        """The HF model with flat past tensors in, flat present tensors out, and logits gathered
        at `logits_index` before the LM head."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.base = model.base_model
            self.lm_head = model.get_output_embeddings()
            self.num_layers = int(model.config.get_text_config(decoder=True).num_hidden_layers)

        def forward(
            self,
            input_ids: torch.Tensor,  # batch x new
            attention_mask: torch.Tensor,  # batch x (past + new), 1 = attend
            position_ids: torch.Tensor,  # batch x new
            logits_index: torch.Tensor,  # batch x positions, indices into new
            *past: torch.Tensor,  # 2 * layers of batch x kv_heads x past x head_dim
        ) -> tuple[torch.Tensor, ...]:
            cache = _SplitCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
            out = self.base(
                input_ids=input_ids,
                attention_mask=additive_mask(attention_mask, input_ids.shape[1]),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state  # batch x new x hidden
            index = logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            picked = torch.gather(hidden, 1, index)  # batch x positions x hidden
            logits = self.lm_head(picked).float()  # batch x positions x vocab
            new: list[torch.Tensor] = []
            for k, v in cache.new:
                new += [k, v]  # batch x kv_heads x new x head_dim
            return (logits, *new)

    def additive_mask(attention_mask: torch.Tensor, new: Any) -> torch.Tensor:
        """Causal AND padding, as 0 / float32-min, batch x 1 x new x total.

        Built here rather than by transformers, whose mask builder freezes shapes when traced.
        Causality is by slot: new token i sits at slot past + i and sees slots <= past + i.
        """
        total = attention_mask.shape[1]
        slots = torch.arange(total, device=attention_mask.device)  # total
        query_slots = slots[total - new :]  # new
        causal = slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # new x total
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # batch x new x total
        zeros = torch.zeros(allowed.shape, dtype=torch.float32)
        mask = zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)
        return mask.unsqueeze(1)  # batch x 1 x new x total

    return CausalLMWithCache

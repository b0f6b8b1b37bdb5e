"""Encoder-decoder bundles (BART, mBART, T5) against the PyTorch models they came from: the
manifest, teacher-forced logits over padded rows, decoding one token a pass over the unified slot
cache, fresh and continuing rows in one pass, the input checks and the loaders."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_seq2seq import BUILDERS, FAMILIES, build_tiny_t5

from ragmix.engine.prompts import PromptTemplate
from ragmix.errors import BundleError
from ragmix.models.generator import Generator
from ragmix.models.seq2seq import Seq2SeqGenerator, load_generator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VARIANTS = (*FAMILIES, "t5-v1.0")  # t5-v1.0: dense-relu FFN, tied and scaled LM head
TEXT = "Paris is the capital of France. The quick brown fox jumps over the lazy dog."
ANSWER = "The city is known for the Eiffel Tower, the Louvre museum and the river Seine."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Seq2SeqGenerator, object]]:
    """Per variant: the loaded bundle, the PyTorch model and the HF tokenizer it came from (the
    t5-v1.0 bundle through export_from_hf, the CLI's path)."""
    from ragmix.models.defaults import export_from_hf
    from ragmix.models.seq2seq_export import export_seq2seq

    root = tmp_path_factory.mktemp("tiny-seq2seq")
    out = {}
    for variant in VARIANTS:
        if variant == "t5-v1.0":
            src = build_tiny_t5(root / f"hf-{variant}", v1_1=False)
            folder = export_from_hf(src, root / variant)
        else:
            src = BUILDERS[variant](root / f"hf-{variant}")
            folder = export_seq2seq(src, root / variant, name=f"tiny-{variant}")
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        out[variant] = (Seq2SeqGenerator.load(folder, threads=1), model.eval(), tokenizer)
    return out


def sources_for(gen: Seq2SeqGenerator) -> list[list[int]]:
    """Three sources of different lengths (E = 20, 4, 1: T5's logarithmic buckets start at a
    distance of 8, and 16 in the encoder)."""
    ids = gen.encode(TEXT)
    return [ids[:20], ids[3:7], ids[10:11]]


def answers_for(gen: Seq2SeqGenerator, lengths=(12, 2, 5)) -> list[list[int]]:
    """Decoder inputs of these lengths after the decoder's start ids."""
    ids = gen.encode(ANSWER)
    return [gen.decoder_start_ids + ids[3 * r : 3 * r + n] for r, n in enumerate(lengths)]


def padded(rows: list[list[int]], pad: int) -> np.ndarray:
    ids = np.full((len(rows), max(map(len, rows))), pad, np.int64)  # batch x width
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    return ids


def hf_logits(model, sources: list[list[int]], answers: list[list[int]], pad: int) -> np.ndarray:
    """The model's teacher-forced logits of a right-padded batch: batch x answer x vocab."""
    ids = torch.from_numpy(padded(sources, pad))
    mask = torch.from_numpy((padded(sources, -1) >= 0).astype(np.int64))
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=torch.from_numpy(padded(answers, pad)),
        )
    return out.logits.numpy()


def teacher_forced(gen: Seq2SeqGenerator, sources, answers) -> np.ndarray:
    """One fresh pass: each row's source then its answer, logits at every answer position
    (shorter rows repeat their last): batch x longest answer x vocab."""
    rows = [s + a for s, a in zip(sources, answers)]
    width = max(map(len, answers))
    index = np.array(
        [[len(s) + min(j, len(a) - 1) for j in range(width)] for s, a in zip(sources, answers)]
    )
    cache = gen.new_cache(len(rows), max(map(len, rows)) + 4)
    lengths = np.zeros(len(rows), np.int64)
    return gen.forward(
        padded(rows, gen.pad_token_id), lengths, index, cache, np.array([len(s) for s in sources])
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_names_the_architecture_tokens_and_templates(tiny, family):
    gen, model, tokenizer = tiny[family]
    m = gen.manifest
    assert (m["architecture"], m["model_type"], m["graph"]) == (
        "encoder-decoder",
        family,
        "seq2seq",
    )
    assert m["kv"]["num_layers"] == 2 and (gen.num_kv_heads, gen.head_dim) == (4, 8)
    assert {"encoder.onnx", "decoder.onnx", "tokenizer.json"} <= set(m["files"])
    assert m["io"]["encoder"]["outputs"][:2] == ["cross.0.key", "cross.0.value"]
    assert m["io"]["decoder"]["inputs"][:5] == [
        "input_ids",
        "lengths",
        "sources",
        "logits_index",
        "past.0.key",
    ]
    assert gen.passage_template == "{title} / {text}" and gen.is_encoder_decoder
    assert gen.eos_token_ids == {model.config.eos_token_id}
    assert gen.pad_token_id == model.config.pad_token_id
    assert gen.forced_eos_token_id is None
    assert gen.sessions == [gen.encoder_session, gen.decoder_session]
    assert gen.providers == ["CPUExecutionProvider"] and gen.device_kind == "cpu"
    expected = {
        "bart": ("<s>{passage} // {question}</s>", [2], 1024),
        "mbart": ("en_XX{passage} // {question}</s>", [2, 4], 1024),  # forced BOS: the language
        "t5": ("{passage} // {question}</s>", [0], 1024),
    }[family]
    assert (gen.prompt_template, gen.decoder_start_ids, gen.max_positions) == expected
    # The engine's prompt pieces are the tokens HF's RAG feeds its generator.
    template = PromptTemplate.parse(gen.prompt_template)
    title, text, question = "Paris", "The {Braces} city of France.", "What is the capital?"
    passage = gen.passage_template.replace("{title}", title).replace("{text}", text)
    ids = gen.encode(template.passage_part(passage)) + gen.encode(template.rest(question))
    assert ids == tokenizer(f"{title} / {text} // {question}").input_ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forced_padded_batch_matches_pytorch(tiny, variant):
    gen, model, _ = tiny[variant]
    sources, answers = sources_for(gen), answers_for(gen)
    got = teacher_forced(gen, sources, answers)
    want = hf_logits(model, sources, answers, gen.pad_token_id)
    assert got.shape == (3, want.shape[1], gen.vocab_size) and got.dtype == np.float32
    for r, answer in enumerate(answers):
        np.testing.assert_allclose(got[r, : len(answer)], want[r, : len(answer)], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_one_token_a_pass_equals_teacher_forcing(tiny, family):
    """A fresh pass with the start tokens, then one token a pass for rows of different source
    lengths: each step's logits are the teacher-forced ones (positions count from the source)."""
    gen, _, _ = tiny[family]
    sources, answers = sources_for(gen), answers_for(gen, (10, 10, 10))
    want = teacher_forced(gen, sources, answers)
    n0 = len(gen.decoder_start_ids)
    e = np.array([len(s) for s in sources])
    cache = gen.new_cache(3, 40)
    first = gen.forward(
        padded([s + a[:n0] for s, a in zip(sources, answers)], gen.pad_token_id),
        np.zeros(3, np.int64),
        (e + n0 - 1)[:, None],
        cache,
        e,
    )
    np.testing.assert_allclose(first[:, 0], want[:, n0 - 1], atol=ATOL, rtol=0)
    lengths = e + n0
    for t in range(n0, len(answers[0])):
        step = np.array([[a[t]] for a in answers])
        got = gen.forward(step, lengths, np.zeros((3, 1), np.int64), cache, e)
        np.testing.assert_allclose(got[:, 0], want[:, t], atol=ATOL, rtol=0)
        lengths = lengths + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pass_mixing_fresh_and_continuing_rows_equals_each_alone(tiny, family):
    gen, _, _ = tiny[family]
    sources, answers = sources_for(gen), answers_for(gen)
    a, b = sources[0] + answers[0][:2], sources[2] + answers[2]  # a continues, b starts
    ea, eb = len(sources[0]), len(sources[2])
    cache = gen.new_cache(2, 40)
    gen.forward(
        np.array([a]),
        np.zeros(1, np.int64),
        np.array([[ea]]),
        [c[:1] for c in cache],
        np.array([ea]),
    )
    alone = [c.copy() for c in cache]
    more = answers[0][2:]
    mixed = gen.forward(
        padded([more, b], gen.pad_token_id),
        np.array([len(a), 0]),
        np.array([[0, len(more) - 1], [eb, len(b) - 1]]),
        cache,
        np.array([ea, eb]),
    )
    want_a = gen.forward(
        np.array([more]),
        np.array([len(a)]),
        np.array([[0, len(more) - 1]]),
        [c[:1] for c in alone],
        np.array([ea]),
    )
    want_b = gen.forward(
        np.array([b]),
        np.zeros(1, np.int64),
        np.array([[eb, len(b) - 1]]),
        [c[1:] for c in alone],
        np.array([eb]),
    )
    np.testing.assert_allclose(mixed[0], want_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed[1], want_b[0], atol=1e-5, rtol=0)
    ends = [len(a) + len(more), len(b)]  # both rows' slots, cross and self, agree
    for got, want in zip(cache, alone):
        for r, end in enumerate(ends):
            np.testing.assert_allclose(got[r, :, :end], want[r, :, :end], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_rows_own_slots_are_written(tiny, family):
    """A fresh row writes [0, new) (cross at [0, E), self after), a continuing row
    [length, length + new): a decoder-only row's footprint, nothing past it."""
    gen, _, _ = tiny[family]
    rng = np.random.default_rng(0)
    cache = [rng.normal(size=c.shape).astype(np.float32) for c in gen.new_cache(2, 16)]
    before = [c.copy() for c in cache]
    ids = padded([[5, 6, 7, gen.decoder_start_token_id], [8, 9]], gen.pad_token_id)
    gen.forward(ids, np.array([0, 6]), np.array([[3], [0]]), cache, np.array([3, 2]))
    for now, was in zip(cache, before):
        changed = np.argwhere((now != was).any(axis=(1, 3))).tolist()  # (row, slot) written
        assert changed == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 6], [1, 7], [1, 8], [1, 9]]


def test_bad_inputs_are_refused_with_a_clear_message(tiny):
    gen, _, _ = tiny["bart"]
    cache = gen.new_cache(1, 8)
    ids, index = np.array([[5, 6, 7, 2]]), np.array([[3]])

    def forward(ids=ids, lengths=(0,), index=index, cache=cache, sources=(3,)):
        return gen.forward(ids, np.array(lengths), index, cache, np.array(sources))

    forward()  # the well-formed call
    with pytest.raises(ValueError, match=r"fresh .* at least its source"):
        forward(lengths=(2,))
    with pytest.raises(ValueError, match="must point at decoder tokens"):
        forward(index=np.array([[2]]))
    with pytest.raises(ValueError, match="fit the cache's 8 slots"):
        forward(lengths=(5,))
    with pytest.raises(ValueError, match="at least one decoder token"):
        forward(sources=(4,))
    with pytest.raises(ValueError, match="sources must be in"):
        forward(sources=(0,))
    with pytest.raises(ValueError, match="needs sources"):
        gen.forward(ids, np.array([0]), index, cache)
    with pytest.raises(ValueError, match="cache must hold"):
        forward(cache=cache[:2])
    with pytest.raises(ValueError, match="input_ids must be in"):
        forward(ids=np.array([[5, 6, 7, gen.vocab_size]]))


def test_load_generator_picks_the_runtime(tiny, tiny_generator_dir):
    gen, _, _ = tiny["bart"]
    assert isinstance(load_generator(gen.folder, threads=1), Seq2SeqGenerator)
    assert type(load_generator(tiny_generator_dir, threads=1)) is Generator


def test_a_decoder_only_bundle_is_refused(tiny_generator_dir):
    with pytest.raises(BundleError, match="not an encoder-decoder"):
        Seq2SeqGenerator.load(tiny_generator_dir)


def test_the_export_check_refuses_graphs_that_disagree_with_pytorch(tiny, tmp_path):
    """The check run before a bundle is put in force, given a model whose weights moved."""
    from ragmix.models.seq2seq_export import check

    gen, model, _ = tiny["bart"]
    check(gen.folder, model)  # the model it was exported from passes
    other = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        gen.folder.parent.parent / "hf-bart", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        weight = other.model.decoder.embed_positions.weight
        weight.add_(0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(BundleError, match="differ from PyTorch"):
        check(gen.folder, other)


def test_an_edited_manifest_architecture_is_refused(tiny, tmp_path):
    gen, _, _ = tiny["t5"]
    copy = shutil.copytree(gen.folder, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["architecture"] = "t5"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not an encoder-decoder"):
        Seq2SeqGenerator.load(copy)


def test_a_folder_transformers_cannot_load_is_refused_with_a_bundle_error(tmp_path):
    from ragmix.models.defaults import export_from_hf

    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "t5"}))  # no weights
    with pytest.raises(BundleError, match="transformers cannot load it"):
        export_from_hf(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()

"""Tiny random-weight encoder-decoder models (BART, mBART, T5) with real tokenizers, for tests.

Each is a folder like one from the Hub (config.json, safetensors, tokenizer.json with the
post-processor that adds the family's special tokens, tokenizer_config.json), so the export path
under test is the one real models take. Weights (biases and layer-norm gains too) are random at
init_std, large enough that passages move the output by nats and greedy top-two gaps stay clear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tiny_models import train_tiny_tokenizer

FAMILIES = ("bart", "mbart", "t5")
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as facebook/bart-*
MBART_SPECIALS = [*BART_SPECIALS, "en_XX"]  # mBART-50: a language code leads the source
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, as google-t5/*
PAD_BIAS = -50.0  # final_logits_bias at PAD: random models would emit it mid-answer


def build_tiny_tokenizer(folder: Path, specials: list[str], single: str, vocab_size: int = 400):
    """A byte-level BPE on the fixed text with `specials` first and a post-processor that adds
    them as `single` (e.g. "<s> $A </s>") does; saves tokenizer.json, returns the vocab size."""
    from tokenizers import processors

    tokenizer = train_tiny_tokenizer(specials, vocab_size)
    used = [t for t in specials if t in single.split()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single,
        pair=f"{single} $B:1 </s>:1",
        special_tokens=[(t, specials.index(t)) for t in used],
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def _tokenizer_config(folder: Path, **tokens: str) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _randomize(model, init_std: float) -> None:
    """Every weight and bias at N(0, init_std), norm gains at 1 + N(0, 0.1): zero biases or unit
    gains would hide a lost bias or a swapped norm in the export."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, init_std)


def _bart_like(folder: Path, family: str, seed: int, init_std: float) -> Path:
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        GenerationConfig,
        MBartConfig,
        MBartForConditionalGeneration,
    )

    mbart = family == "mbart"
    specials = MBART_SPECIALS if mbart else BART_SPECIALS
    single = "en_XX $A </s>" if mbart else "<s> $A </s>"
    vocab = build_tiny_tokenizer(folder, specials, single)
    common = {
        "vocab_size": vocab,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 1024,
        "init_std": init_std,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": None,  # BartConfig's default 2 forces EOS at max_length
        "tie_word_embeddings": False,  # tied random BART copies its input
    }
    if mbart:  # pre-LN, final norms, scaled embeddings
        config = MBartConfig(scale_embedding=True, **common)
        cls = MBartForConditionalGeneration
    else:
        config = BartConfig(**common)
        cls = BartForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, init_std)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, init_std)
        model.final_logits_bias[0, config.pad_token_id] = PAD_BIAS
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=2,
        forced_bos_token_id=specials.index("en_XX") if mbart else None,  # the target language
    ).save_pretrained(folder)
    _tokenizer_config(
        folder, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return folder


def build_tiny_bart(folder: Path, seed: int = 0, init_std: float = 0.2) -> Path:
    """A 2+2-layer random-weight BART (post-LN, layernorm_embedding) in `folder`."""
    return _bart_like(Path(folder), "bart", seed, init_std)


def build_tiny_mbart(folder: Path, seed: int = 0, init_std: float = 0.2) -> Path:
    """A 2+2-layer random-weight mBART (pre-LN, final layer norms, scaled embeddings, a forced
    BOS language code) in `folder`."""
    return _bart_like(Path(folder), "mbart", seed, init_std)


def build_tiny_t5(folder: Path, seed: int = 0, init_std: float = 0.2, v1_1: bool = True) -> Path:
    """A 2+2-layer random-weight T5 in `folder`: as t5 v1.1 (gated-gelu FFN, an LM head of its
    own, unscaled decoder output) or, not `v1_1`, as the original T5 (dense-relu FFN, the LM head
    tied to the embedding, decoder output scaled by d_model**-0.5)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    vocab = build_tiny_tokenizer(folder, T5_SPECIALS, "$A </s>")
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        n_positions=1024,  # the source bound the bundle states (T5 itself sets none)
        feed_forward_proj="gated-gelu" if v1_1 else "relu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=not v1_1,  # transformers reads False as "do not scale the output"
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    if v1_1:  # transformers 5 ties the head whatever the config says, unless the weights differ
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    _randomize(model, init_std)
    model.save_pretrained(folder)
    _tokenizer_config(folder, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return folder


BUILDERS = {"bart": build_tiny_bart, "mbart": build_tiny_mbart, "t5": build_tiny_t5}


def tiny_seq2seq_bundle(folder: Path, family: str = "bart") -> Path:
    """Build the tiny `family` model under folder/hf-<family> and export it to folder/<family>."""
    from ragmix.models.seq2seq_export import export_seq2seq

    if family not in BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    src = BUILDERS[family](Path(folder) / f"hf-{family}")
    return export_seq2seq(src, Path(folder) / family, name=f"tiny-{family}")


def rag_models(model, k: int) -> tuple[Any, Any]:
    """HF's RAG-Token and RAG-Sequence around `model`, built as its docs describe (eval mode:
    the constructor leaves training on)."""
    from transformers import (
        DPRConfig,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    qcfg = DPRConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    c = model.config
    config = RagConfig.from_question_encoder_generator_configs(
        qcfg,
        c,
        n_docs=k,
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        decoder_start_token_id=c.decoder_start_token_id,
    )
    # transformers 5.17's RAG-Sequence loss reads generator.bos_token_id, which T5Config lacks.
    config.generator.bos_token_id = getattr(c, "bos_token_id", None)
    question_encoder = DPRQuestionEncoder(qcfg)
    token = RagTokenForGeneration(config=config, question_encoder=question_encoder, generator=model)
    sequence = RagSequenceForGeneration(
        config=config, question_encoder=question_encoder, generator=model
    )
    return token.eval(), sequence.eval()


def shortest_passage_ids(gen: Any, index: Any, n: int) -> list[str]:
    """Ids of the index's n passages with the shortest encoder inputs: tests choose their passages
    rather than take what the tiny encoder retrieves (a passage of symbols can be ~1,000 byte
    tokens in the tiny tokenizer, past the model's source positions)."""
    from ragmix.engine.prompts import passage_text

    passages = [index.passage(r) for r in range(index.size)]
    size = {
        p.id: len(gen.encode(passage_text(p.title, p.text, gen.passage_template))) for p in passages
    }
    return sorted(size, key=lambda i: (size[i], i))[:n]


LONG_QUESTION = "§" * 700  # 2 bytes a character, 1,400 byte tokens: past 1,024 source positions

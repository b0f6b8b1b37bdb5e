"""A tiny random-weight BERT with a real WordPiece tokenizer, built in-process in a few seconds.

Tests export it through the very code path the default encoder takes, so the ONNX graph, the
tokenizer handling and the bundle checks are exercised without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog while the river flows past the old mill.
Python is a programming language: a function is defined with def, a class with class, and a
generator function uses yield to produce a sequence of values lazily. The for statement iterates
over an iterable; the while statement repeats while a condition is true; break and continue change
the flow of a loop. An exception is raised with raise and handled with try, except, else and finally.
The with statement wraps a block in a context manager. Lambda makes a small anonymous function.
Import loads a module; global and nonlocal change where a name is bound. Lists, tuples, dictionaries
and sets are built-in containers; strings are immutable sequences of characters. Numbers may be
integers, floating point numbers or complex numbers. Retrieval augmented generation mixes passages
retrieved from an index with a language model that writes the answer one token at a time.
Mountains, rivers, forests and cities appear on the map; the weather is cold in winter and warm in
summer. Music, painting and poetry are arts; physics, chemistry and biology are sciences.
"""


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder: BertModel (hidden 32, 2 layers) + tokenizer.json."""
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
        # Wider than BERT's 0.02 so distinct texts get clearly distinct random embeddings.
        initializer_range=0.2,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def tiny_encoder_bundle(folder: Path, seed: int = 0) -> Path:
    """Build the tiny BERT under `folder/hf` and export it to the encoder bundle `folder/bundle`."""
    from ragmix.models.encoder_export import export_encoder

    folder = Path(folder)
    src = build_tiny_bert(folder / "hf", seed=seed)
    return export_encoder(src, folder / "bundle", name=f"tiny-bert-{seed}")

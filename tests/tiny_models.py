"""Tiny random-weight Hugging Face causal LMs with real tokenizers, for tests.

Each is a folder like one downloaded from the Hub (config.json, safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), so the export path under test is the one real
models take. Weights are random but large enough (init_std) that logits differ from token to token.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "gpt2", "qwen2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINING_TEXT = """\
Paris is the capital and largest city of France. The city is known for the Eiffel Tower, the
Louvre museum and the river Seine. Berlin is the capital of Germany; Rome is the capital of Italy.
The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer: Paris.
A passage is a short piece of text. Retrieval finds the passages that answer a question, and the
language model writes the answer using the passage above. {Braces} and "quotes" appear in text too.
"""


def train_tiny_tokenizer(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on the fixed text, `specials` first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> int:
    """Train the tiny BPE with the causal LMs' special tokens and save tokenizer.json; returns
    the vocab size."""
    tokenizer = train_tiny_tokenizer(SPECIAL_TOKENS, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def build_tiny_causal_lm(
    folder: Path, family: str = "llama", seed: int = 0, init_std: float = 0.2
) -> Path:
    """Write a 2-layer random-weight `family` model (llama: ChatML chat template) to `folder`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    folder = Path(folder)
    vocab = build_tiny_tokenizer(folder)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}  # trainer puts special tokens first
    eos = ids["<|im_end|>"] if family == "llama" else ids["<|endoftext|>"]
    common = {
        "vocab_size": vocab,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<pad>"],
        "initializer_range": init_std,
    }
    if family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, **common)
    else:
        cls = LlamaConfig if family == "llama" else Qwen2Config
        config = cls(
            hidden_size=64,  # head_dim 16: GroupQueryAttention needs a multiple of 16
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in the real models
            max_position_embeddings=2048,
            tie_word_embeddings=family == "llama",
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, init_std)  # zero biases would hide a lost bias in the export
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=common["bos_token_id"], eos_token_id=eos, pad_token_id=ids["<pad>"]
    ).save_pretrained(folder)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": SPECIAL_TOKENS[eos],
        "pad_token": "<pad>",
        "model_max_length": 2048,
    }
    if family == "llama":
        tokenizer_config["chat_template"] = CHATML_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def tiny_generator_bundle(folder: Path, family: str = "llama") -> Path:
    """Build the tiny `family` model under folder/hf-<family> and export it to folder/<family>."""
    from ragmix.models.generator_export import export_generator

    src = build_tiny_causal_lm(Path(folder) / f"hf-{family}", family)
    return export_generator(src, Path(folder) / family, name=f"tiny-{family}")

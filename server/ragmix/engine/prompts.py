"""Prompts: the passage part and the rest, tokenised separately.

The template puts the passage before the question, so the tokens of a prompt's passage part depend
on the passage alone. Tokenising the two parts separately (never across the boundary) makes that
exact: a cached passage prefix and a freshly computed one hold the very same token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ragmix.errors import BundleError
from ragmix.models.generator import TITLE_LINE

PASSAGE_SLOT = "{passage}"
QUESTION_SLOT = "{question}"


@dataclass(frozen=True)
class PromptTemplate:
    """A model bundle's prompt template, pre-split at the passage/question boundary."""

    head: str  # everything before the passage
    middle: str  # between the passage and the question
    tail: str  # after the question

    @property
    def split(self) -> int:
        """Where the middle text is cut between the two pieces: before its trailing spaces.

        The constant text between passage and question ("\n\nQuestion:") belongs to the cached
        passage part, so a warm request computes only the question. Cutting before the space keeps
        the ids those of tokenising the whole prompt at once, for byte-level BPE and SentencePiece
        alike, whose pre-tokenisers attach a space to the word after it (" What").
        """
        return len(self.middle.rstrip(" "))

    @classmethod
    def parse(cls, template: str) -> PromptTemplate:
        """Split a str.format template with one {passage} slot followed by one {question} slot."""
        if template.count(PASSAGE_SLOT) != 1 or template.count(QUESTION_SLOT) != 1:
            raise BundleError(
                "prompt_template must contain exactly one {passage} and one {question} slot, got "
                f"{template!r}."
            )
        head, rest = template.split(PASSAGE_SLOT)
        if QUESTION_SLOT not in rest:
            raise BundleError(
                "prompt_template must put {passage} before {question} (the passage prefix cache "
                f"depends on it), got {template!r}."
            )
        middle, tail = rest.split(QUESTION_SLOT)
        # The pieces hold only literal text now: undo str.format's brace escaping.
        return cls(*(p.replace("{{", "{").replace("}}", "}") for p in (head, middle, tail)))

    def passage_part(self, passage: str) -> str:
        return self.head + passage + self.middle[: self.split]

    def rest(self, question: str) -> str:
        return self.middle[self.split :] + question + self.tail


def passage_text(title: str, text: str, form: str = TITLE_LINE) -> str:
    """How one passage fills the {passage} slot: the bundle's passage template (the title line,
    then the text; "{title} / {text}" for encoder-decoder bundles, as HF's retriever writes it),
    or the text alone when it has no title."""
    return form.replace("{title}", title).replace("{text}", text) if title else text


def concat_text(passages: Sequence[tuple[str, str]], form: str = TITLE_LINE) -> str:
    """The {passage} slot of a Concat prompt: all K passages, numbered in rank order."""
    return "\n\n".join(f"[{i}] {passage_text(t, x, form)}" for i, (t, x) in enumerate(passages, 1))


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as two token pieces; `ids` is their concatenation.

    For an encoder-decoder generator the first `source` ids are the encoder's input and the rest
    (the decoder's start tokens, at the end of `rest`) start the decoder; 0 for decoder-only.
    """

    passage: list[int]
    rest: list[int]
    source: int = 0

    @property
    def ids(self) -> list[int]:
        return self.passage + self.rest


def tokenize_prompt(
    template: PromptTemplate,
    encode: Callable[[str], list[int]],
    passage: str,
    question: str,
    start: Sequence[int] = (),
) -> PromptTokens:
    """The prompt's two pieces; `start`: an encoder-decoder's decoder start ids, after the source."""
    passage_ids, rest = encode(template.passage_part(passage)), encode(template.rest(question))
    if not start:
        return PromptTokens(passage_ids, rest)
    return PromptTokens(passage_ids, rest + list(start), len(passage_ids) + len(rest))

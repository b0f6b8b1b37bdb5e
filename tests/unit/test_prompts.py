from __future__ import annotations

import pytest

from ragmix.engine.prompts import PromptTemplate, concat_text, tokenize_prompt
from ragmix.errors import BundleError


def test_template_splits_at_passage_and_unescapes_braces():
    t = PromptTemplate.parse("<s>{{sys}} {passage}\nQ: {question}\nA:")
    # The constant text up to the question's leading space belongs to the (cached) passage part.
    assert t.passage_part("P") == "<s>{sys} P\nQ:"
    assert t.rest("why?") == " why?\nA:"
    assert t.passage_part("P") + t.rest("why?") == "<s>{{sys}} {passage}\nQ: {question}\nA:".format(
        passage="P", question="why?"
    )


@pytest.mark.parametrize(
    "bad", ["{question} {passage}", "{passage}", "{passage} {passage} {question}"]
)
def test_template_must_put_one_passage_before_one_question(bad):
    with pytest.raises(BundleError):
        PromptTemplate.parse(bad)


def test_prompt_is_tokenized_as_two_pieces():
    t = PromptTemplate.parse("[{passage}]({question})")
    calls = []

    def encode(s):
        calls.append(s)
        return [ord(c) for c in s]

    p = tokenize_prompt(t, encode, "abc", "q")
    assert calls == ["[abc](", "q)"]
    assert p.ids == [ord(c) for c in "[abc](q)"]


def test_concat_numbers_passages_in_rank_order():
    assert concat_text([("A", "x"), ("B", "y")]) == "[1] A\nx\n\n[2] B\ny"


def test_two_pieces_tokenise_like_the_whole_prompt(tiny_generator_dir):
    """Cutting before the question's space keeps the ids of tokenising the prompt at once."""
    from ragmix.index import default_corpus
    from ragmix.models.generator import Generator

    gen = Generator.load(tiny_generator_dir, threads=1)
    t = PromptTemplate.parse(gen.prompt_template)
    assert t.passage_part("P").endswith("Question:")
    docs = [d for _, d in zip(range(20), default_corpus())]
    for d in docs:
        for q in ("What does yield do?", "how do I use `with`?", " spaced?", "Why?"):
            p = tokenize_prompt(t, gen.encode, d.text[:400], q)
            assert p.ids == gen.encode(t.passage_part(d.text[:400]) + t.rest(q))

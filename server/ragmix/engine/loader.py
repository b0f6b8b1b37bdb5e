"""Assemble an engine from bundle folders, building the embedded defaults where none is given."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ragmix import paths
from ragmix.config import ServerConfig
from ragmix.engine.engine import Engine, EngineConfig
from ragmix.engine.observer import EngineObserver
from ragmix.engine.request import Request
from ragmix.engine.retrieval import RetrievalBatcher, Retriever
from ragmix.index import IndexBundle, SnapshotPolicy
from ragmix.index.build import ensure_default_index
from ragmix.index.types import SearchKnobs
from ragmix.models import defaults
from ragmix.models.device import resolve as resolve_device
from ragmix.models.encoder import Encoder
from ragmix.models.seq2seq import load_generator

LOG = logging.getLogger(__name__)


def load_engine(
    config: ServerConfig,
    observer: EngineObserver | None = None,
    step_gate: Callable[[Sequence[Request]], None] | None = None,
) -> Engine:
    """Load the bundles named in `config` (or build the defaults) into an engine reporting to
    `observer`."""
    cache = paths.cache_dir(config.cache_dir)
    threads = config.threads or None
    device = resolve_device(config.device)
    if config.generator is None or config.encoder is None:
        gen_dir, enc_dir = defaults.ensure_default_models(cache)
    generator = load_generator(
        Path(config.generator) if config.generator else gen_dir,
        threads=threads,
        providers=device.providers(),
    )
    for session in generator.sessions:
        device.check_placed(session, "generator")
    encoder = Encoder.load(
        Path(config.encoder) if config.encoder else enc_dir,
        threads=threads,
        providers=device.providers(),
    )
    device.check_placed(encoder.session, "encoder")
    index_dir = Path(config.index) if config.index else ensure_default_index(cache, encoder)
    index = IndexBundle.load(
        index_dir,
        encoder_fingerprint=encoder.fingerprint,
        defaults=SearchKnobs(config.nprobe, config.ef_search),
        writable=config.admin_token_file is not None,  # IndexAdmin on: this server writes
        snapshot_policy=SnapshotPolicy(config.snapshot_changes, config.snapshot_seconds),
        gpu=device.index if device.kind == "cuda" else None,
    )
    LOG.info(
        "loaded generator %s and encoder %s on %s (%s), index %s (%d passages, FAISS on %s)",
        generator.name,
        encoder.name,
        device,
        ", ".join(generator.providers),
        index.name,
        index.passages,
        index.searches_on,
    )
    retrieval = RetrievalBatcher(Retriever(encoder, index), observer=observer)
    engine_config = EngineConfig.from_server(config)
    return Engine(generator, retrieval, engine_config, observer, step_gate, str(device))

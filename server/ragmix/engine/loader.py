"""Assemble an engine from bundle folders, building the embedded defaults where none is given."""

from __future__ import annotations

import logging
from pathlib import Path

from ragmix import paths
from ragmix.config import ServerConfig
from ragmix.engine.engine import Engine, EngineConfig
from ragmix.engine.params import Limits
from ragmix.engine.retrieval import RetrievalBatcher, Retriever
from ragmix.index import IndexBundle
from ragmix.index.bundle import ensure_default_index
from ragmix.models import defaults
from ragmix.models.encoder import Encoder
from ragmix.models.generator import Generator

LOG = logging.getLogger(__name__)


def engine_config(config: ServerConfig) -> EngineConfig:
    return EngineConfig(
        limits=Limits(
            max_top_k=config.max_top_k,
            default_top_k=config.default_top_k,
            max_new_tokens=config.max_new_tokens,
            default_max_new_tokens=config.default_max_new_tokens,
            max_query_chars=config.max_query_chars,
        ),
        max_concurrent_requests=config.max_concurrent_requests,
        max_queued_requests=config.max_queued_requests,
        max_batch_rows=config.max_batch_rows,
        passage_cache_bytes=config.passage_cache_bytes,
        max_batch_tokens=config.max_batch_tokens,
    )


def load_engine(config: ServerConfig) -> Engine:
    cache = paths.cache_dir(config.cache_dir)
    threads = config.threads or None
    if config.generator is None or config.encoder is None:
        gen_dir, enc_dir = defaults.ensure_default_models(cache)
    generator = Generator.load(
        Path(config.generator) if config.generator else gen_dir, threads=threads
    )
    encoder = Encoder.load(Path(config.encoder) if config.encoder else enc_dir, threads=threads)
    if config.index:
        index = IndexBundle.load(Path(config.index), encoder_fingerprint=encoder.fingerprint)
    else:
        index_dir = ensure_default_index(cache, encoder)
        index = IndexBundle.load(index_dir, encoder_fingerprint=encoder.fingerprint)
    LOG.info(
        "loaded generator %s, encoder %s, index %s (%d passages)",
        generator.name,
        encoder.name,
        index.name,
        index.size,
    )
    return Engine(generator, RetrievalBatcher(Retriever(encoder, index)), engine_config(config))

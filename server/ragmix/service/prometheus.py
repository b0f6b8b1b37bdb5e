"""Prometheus metrics: the engine's observer, the per-RPC metrics, and the /metrics endpoint.

The engine reports through EngineObserver hooks (it never imports prometheus or grpc);
PrometheusObserver records them. RpcMetrics is filled by the access-log interceptor
(ragmix.service.access_log), which sees every RPC's final status code.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ragmix.engine.observer import EngineObserver

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class PrometheusObserver(EngineObserver):
    """The engine's hooks, recorded on `registry` (its own, so tests and processes never share)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_depth = Gauge(
            "ragmix_queue_depth", "Requests waiting for admission.", registry=r
        )
        self.running_requests = Gauge(
            "ragmix_running_requests", "Requests in the running batch.", registry=r
        )
        self.active_rows = Gauge(
            "ragmix_active_rows", "Passage rows in the running batch.", registry=r
        )
        self.batch_rows = Histogram(
            "ragmix_batch_rows", "Rows in one engine step.", buckets=_ROW_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "ragmix_step_seconds",
            "Time of one engine step (generator pass + mixture kernel).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "ragmix_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "ragmix_inter_token_latency_seconds",
            "Between two consecutive tokens of one request.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.retrieval_seconds = Histogram(
            "ragmix_retrieval_seconds",
            "One batched retrieval (encode + search).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.retrieval_batch = Histogram(
            "ragmix_retrieval_batch_queries",
            "Queries embedded and searched together.",
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "ragmix_prefill_seconds",
            "One prefill of new prompts.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.prefill_tokens = Counter(
            "ragmix_prefill_tokens", "Prompt tokens computed by prefill.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "ragmix_cached_prompt_tokens",
            "Prompt tokens taken from the passage KV cache instead of computed.",
            registry=r,
        )
        self.passage_cache_hits = Counter(
            "ragmix_passage_cache_hits", "Passage KV cache lookups that hit.", registry=r
        )
        self.passage_cache_misses = Counter(
            "ragmix_passage_cache_misses", "Passage KV cache lookups that missed.", registry=r
        )
        self.passage_cache_bytes = Gauge(
            "ragmix_passage_cache_bytes", "Bytes held by the passage KV cache.", registry=r
        )
        self.passage_cache_entries = Gauge(
            "ragmix_passage_cache_entries", "Passages held by the passage KV cache.", registry=r
        )
        self.generated_tokens = Counter(
            "ragmix_generated_tokens", "Tokens generated, all requests.", registry=r
        )
        self.index_passages = Gauge(
            "ragmix_index_passages", "Passages a search can return.", registry=r
        )
        self.index_changes = Counter(
            "ragmix_index_changes",
            "Passages added or deleted online (IndexAdmin).",
            ["kind"],
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "ragmix_index_snapshot_seconds",
            "FAISS snapshot writes (retrieval waits meanwhile).",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.finished = Counter(
            "ragmix_finished_requests",
            "Requests that left the engine, by finish reason.",
            ["reason"],
            registry=r,
        )

    def on_step(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def on_queue(self, waiting: int, running: int, rows: int) -> None:
        self.queue_depth.set(waiting)
        self.running_requests.set(running)
        self.active_rows.set(rows)

    def on_prefill(self, rows: int, tokens: int, cached_tokens: int, seconds: float) -> None:
        self.prefill_tokens.inc(tokens)
        self.cached_prompt_tokens.inc(cached_tokens)
        self.prefill_seconds.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def on_retrieval(self, batch: int, seconds: float) -> None:
        self.retrieval_batch.observe(batch)
        self.retrieval_seconds.observe(seconds)

    def on_passage_cache(self, hits: int, misses: int, bytes_used: int, entries: int) -> None:
        self.passage_cache_hits.inc(hits)
        self.passage_cache_misses.inc(misses)
        self.passage_cache_bytes.set(bytes_used)
        self.passage_cache_entries.set(entries)

    def on_finish(self, reason: str, generated_tokens: int) -> None:
        self.finished.labels(reason).inc()
        self.generated_tokens.inc(generated_tokens)

    def on_index_change(self, kind: str, passages: int, searchable: int) -> None:
        if passages:
            self.index_changes.labels(kind).inc(passages)
        self.index_passages.set(searchable)

    def on_snapshot(self, seconds: float) -> None:
        self.snapshot_seconds.observe(seconds)


class RpcMetrics:
    """Per-RPC counters and durations, and a gauge of the RagService RPCs in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ragmix_requests",
            "Finished RPCs by method and final gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "ragmix_request_seconds",
            "RPC duration by method (a Generate: its whole stream).",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ragmix_in_flight_rpcs", "RagService RPCs being served.", registry=registry
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the server (to shut down)."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from e
    return server

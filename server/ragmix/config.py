"""Server settings: one dataclass, filled from defaults < config file < RAGMIX_* env vars < CLI flags.

Validated once at start-up, so a bad setting stops the server with a message rather than a request
failing later.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ragmix.errors import ValidationError

ENV_PREFIX = "RAGMIX_"


@dataclass
class ServerConfig:
    """Every knob of `ragmix serve`. Field names are the flag names with '-' for '_'."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = pick a free one)"})
    generator: str | None = field(
        default=None, metadata={"help": "generator bundle folder (default: embedded SmolLM2)"}
    )
    encoder: str | None = field(
        default=None, metadata={"help": "encoder bundle folder (default: embedded MiniLM)"}
    )
    index: str | None = field(
        default=None, metadata={"help": "index bundle folder (default: Python reference topics)"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where default bundles are built (env RAGMIX_CACHE_DIR)"}
    )
    threads: int = field(default=0, metadata={"help": "onnxruntime intra-op threads (0 = cores)"})
    device: str = field(
        default="auto",
        metadata={"help": "where the models run: auto (CUDA if onnxruntime has it), cpu, cuda[:N]"},
    )
    max_top_k: int = field(default=20, metadata={"help": "largest top_k a request may ask for"})
    default_top_k: int = field(default=5, metadata={"help": "top_k when a request leaves it 0"})
    max_new_tokens: int = field(default=512, metadata={"help": "largest max_new_tokens accepted"})
    default_max_new_tokens: int = field(
        default=128, metadata={"help": "max_new_tokens when a request leaves it 0"}
    )
    max_query_chars: int = field(default=2000, metadata={"help": "longest query accepted"})
    max_concurrent_requests: int = field(
        default=16, metadata={"help": "requests decoded at once in the running batch"}
    )
    max_queued_requests: int = field(
        default=64, metadata={"help": "requests waiting for admission; beyond: RESOURCE_EXHAUSTED"}
    )
    max_batch_rows: int = field(
        default=80,
        metadata={
            "help": "decode rows in the running batch (K per request, K x num_beams for "
            "RAG-Sequence); 80 = 16 requests of K = 5"
        },
    )
    max_batch_tokens: int = field(
        default=1 << 16,
        metadata={"help": "KV cache slots (rows x length) the running batch may reach"},
    )
    max_prefill_tokens: int = field(
        default=128,
        metadata={
            "help": "prompt tokens prefilled per step beside the decode rows (chunked prefill; "
            "a row's past and scored logits count too): what one admission can add to the "
            "running streams' step time. 128 prefills as fast per token as 256 on the default "
            "model (1.67 vs 1.68 ms/token, 2 cores) at half the stall"
        },
    )
    passage_cache_bytes: int = field(
        default=1 << 30,
        metadata={"help": "byte budget of the passage prefix KV cache (0 = off)"},
    )
    grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long in-flight streams may finish"}
    )
    nprobe: int = field(
        default=0,
        metadata={
            "help": "IVF-PQ index: inverted lists visited per query (0 = 16); requests may set their own"
        },
    )
    ef_search: int = field(
        default=0,
        metadata={
            "help": "HNSW index: candidate list size per query (0 = 64); requests may set their own"
        },
    )
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics HTTP port on --host (0 = off)"}
    )
    log_format: str = field(
        default="text", metadata={"help": "log lines as 'text' (logfmt request lines) or 'json'"}
    )
    tls_cert: str | None = field(
        default=None, metadata={"help": "PEM server certificate (chain); with --tls-key: TLS"}
    )
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle; clients must present a cert it signed (mutual TLS)"},
    )
    auth_token_file: str | None = field(
        default=None,
        metadata={"help": "file of bearer tokens, one per line; RPCs then need one (health open)"},
    )
    admin_token_file: str | None = field(
        default=None,
        metadata={
            "help": "file of admin tokens, one per line: enables IndexAdmin (adding and "
            "deleting passages online), which always needs one of them"
        },
    )
    snapshot_changes: int = field(
        default=1000,
        metadata={"help": "with --admin-token-file: save the FAISS index after this many changes"},
    )
    snapshot_seconds: float = field(
        default=60.0,
        metadata={"help": "... or this many seconds after the first unsaved change"},
    )
    max_admin_batch: int = field(
        default=256, metadata={"help": "most passages per AddPassages / ids per DeletePassages"}
    )
    max_passage_chars: int = field(
        default=20_000, metadata={"help": "longest passage text AddPassages accepts"}
    )
    config: str | None = field(default=None, metadata={"help": "TOML file with these settings"})

    def validate(self) -> ServerConfig:
        positive = (
            "max_top_k",
            "default_top_k",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_query_chars",
            "max_concurrent_requests",
            "max_batch_rows",
            "max_batch_tokens",
            "max_prefill_tokens",
            "snapshot_changes",
            "max_admin_batch",
            "max_passage_chars",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValidationError(name, f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_queued_requests < 0:
            raise ValidationError(
                "max_queued_requests",
                f"max_queued_requests must be >= 0, got {self.max_queued_requests}.",
            )
        if not 0 <= self.port <= 65535:
            raise ValidationError("port", f"port must be in [0, 65535], got {self.port}.")
        if self.default_top_k > self.max_top_k:
            raise ValidationError(
                "default_top_k",
                f"default_top_k ({self.default_top_k}) must not exceed max_top_k ({self.max_top_k}).",
            )
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValidationError(
                "default_max_new_tokens",
                f"default_max_new_tokens ({self.default_max_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens}).",
            )
        if self.max_batch_rows < self.max_top_k:
            raise ValidationError(
                "max_batch_rows",
                f"max_batch_rows ({self.max_batch_rows}) must be >= max_top_k ({self.max_top_k}) "
                "so one request always fits.",
            )
        if self.passage_cache_bytes < 0:
            raise ValidationError(
                "passage_cache_bytes",
                f"passage_cache_bytes must be >= 0 (0 = off), got {self.passage_cache_bytes}.",
            )
        for name, hi in (("nprobe", 65_536), ("ef_search", 32_768)):
            if not 0 <= getattr(self, name) <= hi:
                raise ValidationError(
                    name, f"{name} must be in [0, {hi}], got {getattr(self, name)}."
                )
        from ragmix.models.device import parse

        parse(self.device)  # the format here; whether the device exists, at load
        if not 0 < self.snapshot_seconds <= 86_400:
            raise ValidationError(
                "snapshot_seconds",
                f"snapshot_seconds must be in (0, 86400], got {self.snapshot_seconds}.",
            )
        if self.grace_seconds < 0:
            raise ValidationError(
                "grace_seconds", f"grace_seconds must be >= 0, got {self.grace_seconds}."
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ValidationError(
                "metrics_port",
                f"metrics_port must be in [0, 65535] (0 = off), got {self.metrics_port}.",
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise ValidationError(
                "metrics_port", f"metrics_port must differ from port ({self.port})."
            )
        if self.log_format not in ("text", "json"):
            raise ValidationError(
                "log_format", f"log_format must be 'text' or 'json', got {self.log_format!r}."
            )
        self._validate_security()
        return self

    def _validate_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValidationError(
                missing,
                f"{given} was given without {missing}; TLS needs both --tls-cert and --tls-key.",
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ValidationError(
                "tls_client_ca",
                "tls_client_ca (mutual TLS) needs the server's own --tls-cert and --tls-key too.",
            )
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path and not (Path(path).is_file() and os.access(path, os.R_OK)):
                raise ValidationError(name, f"{name}: cannot read file {path}.")


def _coerce(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except (TypeError, ValueError) as e:
        raise ValidationError(f.name, f"{f.name} must be a number, got {raw!r}.") from e
    return None if raw in ("", None) else str(raw)


def load_config(
    cli: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ServerConfig:
    """Merge defaults, the TOML file (`--config` or RAGMIX_CONFIG), env vars and CLI values."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)
    known = {f.name: f for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    path = cli.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValidationError("config", f"cannot read config file {path}: {e}") from e
        data = data.get("serve", data)
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValidationError(
                    "config", f"unknown setting {key!r} in {path}; known: {', '.join(known)}."
                )
            values[name] = _coerce(known[name], raw)
    for name, f in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and name != "config":
            values[name] = _coerce(f, raw)
    for name, raw in cli.items():
        if name in known:
            values[name] = _coerce(known[name], raw)
    return ServerConfig(**values).validate()

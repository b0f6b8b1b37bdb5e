"""The Ray Serve application: RagIngress (gRPC front door) -> RagReplica (engines), built from
ragmix's own settings, and the Serve config that deploys the same on an existing cluster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application

from ragmix.cluster.ingress import RagIngress
from ragmix.cluster.replica import RagReplica
from ragmix.config import ServerConfig
from ragmix.errors import ValidationError

APP_NAME = "ragmix"
ROUTE = "/ragmix"
"""The application's route: Ray's proxies only route to applications that have one (gRPC
calls reach it by the RPC's method name; HTTP requests to it are refused)."""
SERVICER_FUNCTIONS = [
    "ragmix_client.proto.ragmix_pb2_grpc.add_RagServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
"""What Ray's gRPC proxy registers: RagService and Health, routed to RagIngress."""


@dataclass(frozen=True)
class Scaling:
    """How many engines and what each holds: fixed `replicas`, or autoscaling between
    `min_replicas` and `max_replicas` on ongoing requests."""

    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0  # > 0: autoscale
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_replicas: int = 1

    @classmethod
    def parse(cls, replicas: int, autoscale: str | None, **resources: Any) -> Scaling:
        if autoscale:
            lo, sep, hi = autoscale.partition(":")
            if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
                raise ValidationError(
                    "autoscale",
                    f"autoscale must read MIN:MAX with 1 <= MIN <= MAX, got {autoscale!r}.",
                )
            return cls(replicas=int(lo), min_replicas=int(lo), max_replicas=int(hi), **resources)
        return cls(replicas=replicas, **resources).check()

    def check(self) -> Scaling:
        if self.replicas < 1:
            raise ValidationError("replicas", f"replicas must be >= 1, got {self.replicas}.")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValidationError("replica_cpus", "replica CPUs and GPUs must be >= 0.")
        return self

    def replica_options(self, config: ServerConfig) -> dict[str, Any]:
        """RagReplica's deployment options: an engine takes what it can run or queue itself,
        Ray's router holds no more than the engine's queue in front of the replicas."""
        options: dict[str, Any] = {
            "max_ongoing_requests": config.max_concurrent_requests + config.max_queued_requests,
            "max_queued_requests": max(config.max_queued_requests, 1),
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "graceful_shutdown_timeout_s": config.grace_seconds,
            "health_check_period_s": 5,
        }
        if self.max_replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": config.max_concurrent_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


def settings_of(config: ServerConfig) -> dict[str, Any]:
    """The ServerConfig fields a replica needs that differ from the defaults, as plain values
    (they travel to other nodes, and a Serve config lists only what was chosen)."""
    defaults = dataclasses.asdict(ServerConfig())
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("config", "port", "host") and v != defaults[k]
    }


def build_app(config: ServerConfig, scaling: Scaling) -> Application:
    replicas = serve.deployment(RagReplica, name="RagReplica").options(
        **scaling.replica_options(config)
    )
    ingress = serve.deployment(RagIngress, name="RagIngress").options(
        num_replicas=scaling.ingress_replicas,
        max_ongoing_requests=100_000,  # it only forwards; the replicas hold the limits
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replicas.bind(settings_of(config)), config.auth_token_file)


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: ragmix.cluster.app:app_builder` in a Serve config; `args` holds `settings`
    (ragmix serve flags, underscored) and `scaling` (Scaling's fields)."""
    config = ServerConfig(**args.get("settings", {})).validate()
    return build_app(config, Scaling(**args.get("scaling", {})).check())


def serve_config(config: ServerConfig, scaling: Scaling, grpc_port: int) -> dict[str, Any]:
    """The Serve config (for `serve deploy`) that deploys what `ragmix cluster serve` runs."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": ROUTE,
                "import_path": "ragmix.cluster.app:app_builder",
                "args": {
                    "settings": settings_of(config),
                    "scaling": dataclasses.asdict(scaling),
                },
            }
        ],
    }

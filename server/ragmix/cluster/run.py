"""`ragmix cluster serve`: start (or join) a Ray cluster, deploy the application, serve until a
signal; `ragmix cluster config`: the Serve config YAML for `serve deploy`."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from ragmix.cluster.app import APP_NAME, ROUTE, SERVICER_FUNCTIONS, Scaling, build_app, serve_config
from ragmix.cluster.proxy_host import HOST_ENV
from ragmix.config import ServerConfig

LOG = logging.getLogger(__name__)


def start_ray(address: str | None, host: str, num_cpus: int | None) -> None:
    """Join the cluster at `address`, or start a local one (its services on `host`)."""
    import ray

    runtime_env: dict[str, Any] = {
        "worker_process_setup_hook": "ragmix.cluster.proxy_host.setup",
        "env_vars": {HOST_ENV: host},
    }
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=host if host not in ("0.0.0.0", "::") else None,
        runtime_env=runtime_env,
    )


def with_default_bundles(config: ServerConfig) -> ServerConfig:
    """`config` with the embedded defaults built into the cache and named by path: replicas on
    one machine then load them instead of racing to build them (the bundle lock would refuse all
    but one, and Ray would restart the rest)."""
    if config.generator and config.encoder and config.index:
        return config
    from ragmix import paths
    from ragmix.index.build import ensure_default_index
    from ragmix.models.defaults import ensure_default_models
    from ragmix.models.encoder import Encoder

    cache = paths.cache_dir(config.cache_dir)
    generator, encoder = ensure_default_models(cache)
    generator = config.generator or str(generator)
    encoder = config.encoder or str(encoder)
    index = config.index or str(ensure_default_index(cache, Encoder.load(Path(encoder))))
    return dataclasses.replace(config, generator=generator, encoder=encoder, index=index)


def serve_forever(
    config: ServerConfig,
    scaling: Scaling,
    *,
    grpc_port: int,
    http_port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Deploy and serve until SIGTERM/SIGINT; then delete the application (its replicas drain
    for up to --grace-seconds) and stop Serve."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    if address is None:  # one machine: build the defaults once, not in every replica at once
        config = with_default_bundles(config)
    start_ray(address, config.host, num_cpus)
    serve.start(
        http_options={"host": config.host, "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    serve.run(build_app(config, scaling), name=APP_NAME, route_prefix=ROUTE)
    # Tests and scripts read this line to know the cluster is up.
    print(f"ragmix cluster serving on {config.host}:{grpc_port}", flush=True)
    LOG.info("application %s: %s", APP_NAME, scaling)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    LOG.info("shutting down: draining for up to %.0f s", config.grace_seconds)
    serve.delete(APP_NAME)  # replicas drain within graceful_shutdown_timeout_s
    serve.shutdown()


def write_config(config: ServerConfig, scaling: Scaling, grpc_port: int, out: Path | None) -> str:
    import yaml

    text = yaml.safe_dump(serve_config(config, scaling, grpc_port), sort_keys=False)
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return text

"""Bind Ray Serve's gRPC proxy to the host `ragmix cluster serve --host` names.

Ray 2.60's proxy listens on [::]:port, every interface, with no setting to change it
(ray/serve/_private/grpc_util.py start_grpc_server). ragmix serves on loopback unless told
otherwise, so each Ray worker process runs `setup` at start (runtime_env
worker_process_setup_hook) and the proxy's address helper binds RAGMIX_GRPC_HOST instead.
"""

from __future__ import annotations

import os
from typing import Any

HOST_ENV = "RAGMIX_GRPC_HOST"


def setup() -> None:
    host = os.environ.get(HOST_ENV, "")
    if not host or host in ("0.0.0.0", "::"):
        return
    from ray.serve._private import default_impl

    def add_grpc_address(server: Any, address: str) -> None:  # Ray's gRPCGenericServer
        port = address.rpartition(":")[2]
        server.add_insecure_port(f"{host}:{port}")

    default_impl.add_grpc_address = add_grpc_address

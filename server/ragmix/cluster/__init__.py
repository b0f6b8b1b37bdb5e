"""ragmix on Ray Serve: the single-node engine as a replica, Ray's gRPC proxy as the front door.

It imports the engine and the service's translation; nothing imports it (docs/DESIGN.md § Scale-out).
Needs the `cluster` extra (`pip install ragmix[cluster]`).
"""

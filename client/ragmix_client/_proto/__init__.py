"""Transitional alias of `ragmix_client.proto`, the stubs' public home; removed once no module
imports this name."""

from ragmix_client.proto import ragmix_pb2, ragmix_pb2_grpc

__all__ = ["ragmix_pb2", "ragmix_pb2_grpc"]

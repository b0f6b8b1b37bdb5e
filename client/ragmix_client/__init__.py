"""Python SDK for ragmix, the RAG inference server: `RagClient` over gRPC (grpcio + protobuf only).

from ragmix_client import RagClient
with RagClient("127.0.0.1:50051") as client:
    for event in client.generate("What does the yield statement do?"):
        ...
"""

from ragmix_client._version import __version__
from ragmix_client.client import RagClient
from ragmix_client.types import (
    Answer,
    Done,
    Event,
    Info,
    Passage,
    RagmixError,
    Token,
    Usage,
)

__all__ = [
    "Answer",
    "Done",
    "Event",
    "Info",
    "Passage",
    "RagClient",
    "RagmixError",
    "Token",
    "Usage",
    "__version__",
]

"""Python SDK for ragmix, the RAG inference server, over gRPC (grpcio + protobuf only).

    from ragmix_client import RagClient, Token

    with RagClient("127.0.0.1:50051") as client:
        for event in client.generate("What does the yield statement do?", top_k=4):
            if isinstance(event, Token):
                print(event.text, end="", flush=True)

`AsyncRagClient` has the same methods for asyncio. Every failure raises `RagmixError(code, message)`.
"""

from ragmix_client._connection import NO_RETRY, RetryPolicy
from ragmix_client._version import __version__
from ragmix_client.admin import IndexAdminClient
from ragmix_client.aio import AsyncRagClient
from ragmix_client.client import RagClient
from ragmix_client.types import (
    AddResult,
    Alternative,
    Answer,
    DeleteResult,
    Done,
    Event,
    IndexStats,
    Info,
    MixtureScore,
    NewPassage,
    Passage,
    Passages,
    RagmixError,
    ScoredSequence,
    ScoreResult,
    Timings,
    Token,
    Usage,
)

__all__ = [
    "NO_RETRY",
    "AddResult",
    "Alternative",
    "Answer",
    "AsyncRagClient",
    "DeleteResult",
    "Done",
    "Event",
    "IndexAdminClient",
    "IndexStats",
    "Info",
    "MixtureScore",
    "NewPassage",
    "Passage",
    "Passages",
    "RagClient",
    "RagmixError",
    "RetryPolicy",
    "ScoreResult",
    "ScoredSequence",
    "Timings",
    "Token",
    "Usage",
    "__version__",
]

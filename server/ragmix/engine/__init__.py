"""The serving engine: the asyncio front door and the engine-thread core it feeds."""

from ragmix.engine.engine import Engine

__all__ = ["Engine"]

"""ragmix: retrieval-augmented generation served as a mixture model over retrieved passages."""

__version__ = "0.1.0"

"""finopsd: FinOps daemon for AI."""

__version__ = "0.1.0"

"""ScaiGrid: an LLM gateway node (HTTP and gRPC APIs, scheduler worker, storage proxy)."""

__version__ = "0.1.0"

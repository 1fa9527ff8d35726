"""Serving: an OpenAI-compatible HTTP API over an engine doing continuous batching on a paged KV cache.

``Engine`` (``engine.py``) is independent of HTTP; ``create_app`` (``app.py``) is the FastAPI layer that
translates OpenAI requests into engine requests; ``serve`` runs it with uvicorn.
"""

from .engine import Engine, GenerationRequest, QueueFullError, RequestOutput
from .metrics import ServingMetrics

__all__ = ["Engine", "GenerationRequest", "QueueFullError", "RequestOutput", "ServingMetrics"]

"""``serve``: load a model, build the engine and the app, run uvicorn."""

from __future__ import annotations

import uvicorn
from prometheus_client import start_http_server

from ..models import TrellisForCausalLM, load_model
from .app import create_app
from .engine import Engine

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-q4_1"  # the embedded default model


def serve(model_source: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          kv_blocks: int = 256, block_size: int = 16, max_queue: int = 64, api_key: str | None = None,
          metrics_port: int | None = None, batch_invariant: bool = True, log_level: str = "info") -> None:
    """Serve ``model_source`` (any MODEL argument; None: the embedded default) over the OpenAI API at
    ``http://host:port/v1`` until interrupted; ``metrics_port`` also serves ``/metrics`` there."""
    model, tokenizer = load_model(model_source)
    if not isinstance(model, TrellisForCausalLM):
        raise ValueError(f"{model.config.model_type}: serving needs an architecture TrellisForCausalLM supports")
    if tokenizer is None:
        raise ValueError(f"{model_source}: the model has no tokenizer")
    engine = Engine(model, tokenizer, max_batch=max_batch, num_blocks=kv_blocks, block_size=block_size,
                    max_queue=max_queue, batch_invariant=batch_invariant)
    app = create_app(engine, model_source or DEFAULT_MODEL_NAME, api_key=api_key)
    if metrics_port is not None:
        start_http_server(metrics_port, addr=host, registry=engine.metrics.registry)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

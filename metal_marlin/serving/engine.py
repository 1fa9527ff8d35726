"""The serving engine, independent of HTTP: a bounded request queue, a scheduler doing continuous
batching over a paged KV cache, and the model step, run by one background thread.

Each iteration (``step``):

1. cancelled requests leave (their blocks return to the pool);
2. waiting requests are admitted in arrival order while the running batch has room (``max_batch``), the
   pool has the blocks for the whole request (prompt + ``max_tokens``), and the iteration's prefill budget
   lasts; each is prefilled on its own (one forward of its prompt) and its first token sampled;
3. one decode step for every running request: the pending tokens of the whole batch go through the
   model together, each row over its own blocks, and each request samples its next token.

Requests finish at a stop token, a stop string, ``max_tokens``, cancellation or an error, and their
blocks are freed at once. A request that cannot be admitted for lack of blocks waits; the waiting queue
is bounded (``QueueFullError`` beyond it).

Batch invariance: with ``batch_invariant`` (the default) the decode step runs in passes of exactly
``DECODE_PASS_ROWS`` rows, padding the last pass with rows that read and write only the reserved pad
block, and attention runs per group of rows with equal block-table width (``PagedStep``). Every kernel
call then has the same shape whatever else is running, and the kernels treat the rows of a call alike,
so a dense model's tokens for a request do not depend on the other requests (tests/serving checks this
bit for bit). The CPU's quantized GEMV, torch's float32 GEMM and the reference paged attention round
differently for different row counts or widths; this is what it takes to make them agree. MoE layers
still group a step's tokens by expert, so MoE models are not batch-invariant. Without it, the passes are
not padded: faster at low concurrency, with logits that may differ in the last bits with the batch
composition. Either way a pass holds at most ``DECODE_PASS_ROWS`` rows, the most the fused CPU decode
step takes (models/fused_decode.py).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import SamplingParams, sample_next
from .metrics import ServingMetrics
from .text import IncrementalText

log = logging.getLogger(__name__)

DECODE_PASS_ROWS = 8  # the GEMV height of the quantized kernels (CPU and Metal), the fused step's batch


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: ``prompt_ids`` continued by up to ``max_tokens`` tokens."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """A piece of a request's result. ``finish_reason`` is None until the last one: "stop" (stop token or
    string), "length" (``max_tokens``), "cancelled" or "error" (with ``error``)."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class _Sequence:
    request_id: int
    request: GenerationRequest
    on_output: Callable[[RequestOutput], None]
    text: IncrementalText
    submitted: float
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache
    pending: int | None = None  # sampled, not yet in the cache
    generated: int = 0
    last_token_time: float = 0.0


class Engine:
    """Continuous batching over ``model`` (a ``TrellisForCausalLM``) with a paged KV cache of
    ``num_blocks`` blocks of ``block_size`` positions. ``submit`` and ``cancel`` are thread-safe; outputs
    are delivered by calling ``on_output`` from the engine's thread (``start``), or from the caller of
    ``step`` when driven by hand."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, num_blocks: int = 256, block_size: int = 16,
                 max_queue: int = 64, max_model_len: int | None = None, prefill_tokens_per_step: int = 2048,
                 batch_invariant: bool = True, metrics: ServingMetrics | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_tokens_per_step < 1:
            raise ValueError(f"max_batch ({max_batch}) and prefill_tokens_per_step ({prefill_tokens_per_step}) "
                             f"must be >= 1, max_queue ({max_queue}) >= 0")
        self.model, self.tokenizer = model, tokenizer
        # the engine thread decodes with its own copy: a fast tokenizer must not be used by two threads at once
        self._detokenizer = copy.deepcopy(tokenizer)
        self.cache = model.new_paged_cache(num_blocks, block_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        context = getattr(model.config, "max_position_embeddings", None) or block_size * num_blocks
        self.max_model_len = min(context, max_model_len or context)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.batch_invariant = batch_invariant
        self.stop_ids = frozenset(model.stop_ids())
        self.metrics = metrics or ServingMetrics()
        self.metrics.kv_blocks_total.set(self.cache.allocator.capacity)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._cancelled: set[int] = set()
        self._running: list[_Sequence] = []
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the public, thread-safe side ------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError if the request can never be served (the HTTP layer checks before submitting)."""
        prompt = len(request.prompt_ids)
        if prompt == 0:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if prompt + request.max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"has {prompt} prompt tokens and max_tokens {request.max_tokens}")
        if self.blocks_needed(request) > self.cache.allocator.capacity:
            raise ValueError(f"the request needs {self.blocks_needed(request)} KV blocks; the cache has "
                             f"{self.cache.allocator.capacity}")

    def blocks_needed(self, request: GenerationRequest) -> int:
        # the last sampled token is never written to the cache
        return self.cache.blocks_for(len(request.prompt_ids) + request.max_tokens - 1)

    def submit(self, request: GenerationRequest, on_output: Callable[[RequestOutput], None]) -> int:
        """Queue a request; returns its id. Raises ValueError (see ``check``) or QueueFullError."""
        self.check(request)
        seed = request.sampling.seed
        generator = None if seed is None else torch.Generator(self.model.device).manual_seed(seed)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the server's queue is full ({self.max_queue} waiting requests)")
            request_id = self._next_id
            self._next_id += 1
            self._waiting.append(_Sequence(request_id, request, on_output,
                                           IncrementalText(self._detokenizer, request.stop), time.perf_counter(),
                                           generator))
            self.metrics.queue_depth.set(len(self._waiting))
            self._work.notify()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request; its blocks are freed at the next step boundary."""
        with self._lock:
            self._cancelled.add(request_id)
            self._work.notify()

    def start(self) -> None:
        """Run ``step`` in a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="metal-marlin-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def blocks_used(self) -> int:
        return self.cache.allocator.num_used

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running or self._cancelled):
                    self._work.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug outside the per-request handling: fail the batch, keep serving
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, "error", error="internal error in the engine step")
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "cancelled")

    def step(self) -> None:
        """One iteration: cancellations, admissions (with their prefills), one decode step."""
        self._apply_cancellations()
        self._admit()
        if self._running:
            self._decode()
        self._update_gauges()

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [s for s in self._waiting if s.request_id in cancelled]
            for seq in waiting:
                self._waiting.remove(seq)
        for seq in waiting + [s for s in self._running if s.request_id in cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        prefilled = 0  # prompt tokens this iteration: the first admission is never refused for its length
        allocator = self.cache.allocator
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting[0]
                prompt = len(seq.request.prompt_ids)
                over_budget = prefilled and prefilled + prompt > self.prefill_tokens_per_step
                if over_budget or self.blocks_needed(seq.request) > allocator.num_free:
                    return
                self._waiting.popleft()
            prefilled += prompt
            seq.blocks = allocator.allocate(self.blocks_needed(seq.request))
            self._running.append(seq)
            try:
                ids = torch.tensor([seq.request.prompt_ids], device=self.model.device)
                with torch.inference_mode():
                    logits = self.model(ids, cache=self.cache.step([seq.blocks], [0], prompt), logits_to_keep=1)
                seq.length = prompt
                self._accept(seq, logits[0, -1])
            except Exception as err:
                log.exception("prefill of request %d failed", seq.request_id)
                self._finish(seq, "error", error=f"{type(err).__name__}: {err}")

    def _decode(self) -> None:
        rows = list(self._running)
        size = DECODE_PASS_ROWS
        for first in range(0, len(rows), size):
            chunk = rows[first:first + size]
            pad = size - len(chunk) if self.batch_invariant else 0
            tokens = torch.tensor([[s.pending] for s in chunk] + [[0]] * pad, device=self.model.device)
            try:
                step = self.cache.step([s.blocks for s in chunk], [s.length for s in chunk], 1,
                                       DECODE_PASS_ROWS if self.batch_invariant else None)
                with torch.inference_mode():
                    logits = self.model(tokens, cache=step, logits_to_keep=1)
            except Exception as err:
                log.exception("decode step failed")
                for seq in chunk:
                    self._finish(seq, "error", error=f"{type(err).__name__}: {err}")
                continue
            for i, seq in enumerate(chunk):
                seq.length += 1
                try:
                    self._accept(seq, logits[i, -1])
                except Exception as err:
                    log.exception("request %d failed", seq.request_id)
                    self._finish(seq, "error", error=f"{type(err).__name__}: {err}")

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits and deliver it (or finish)."""
        token = int(sample_next(logits.unsqueeze(0), seq.request.sampling, None, seq.generator)[0])
        now = time.perf_counter()
        if seq.generated == 0:
            self.metrics.time_to_first_token.observe(now - seq.submitted)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if token in self.stop_ids:
            self._finish(seq, "stop", text=seq.text.flush())
            return
        seq.generated += 1
        self.metrics.generated_tokens.inc()
        piece, stopped = seq.text.add(token)
        if stopped:
            self._finish(seq, "stop", text=piece, token_ids=(token,))
        elif seq.generated == seq.request.max_tokens:
            self._finish(seq, "length", text=piece + seq.text.flush(), token_ids=(token,))
        else:
            seq.pending = token
            self._emit(seq, RequestOutput(seq.request_id, piece, (token,), None, len(seq.request.prompt_ids),
                                          seq.generated))

    def _finish(self, seq: _Sequence, reason: str, text: str = "", token_ids: tuple[int, ...] = (),
                error: str | None = None) -> None:
        if seq.blocks:
            self.cache.allocator.free(seq.blocks)
            seq.blocks = []
        if seq in self._running:
            self._running.remove(seq)
        self._emit(seq, RequestOutput(seq.request_id, text, token_ids, reason, len(seq.request.prompt_ids),
                                      seq.generated, error))

    def _emit(self, seq: _Sequence, output: RequestOutput) -> None:
        try:
            seq.on_output(output)
        except Exception:  # the receiver is gone: stop generating for it
            log.exception("delivering output of request %d failed", seq.request_id)
            if output.finish_reason is None:
                self.cancel(seq.request_id)

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._running))
        self.metrics.kv_blocks_used.set(self.cache.allocator.num_used)

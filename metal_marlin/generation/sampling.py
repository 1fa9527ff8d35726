"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 disable those filters.
    ``repetition_penalty`` (transformers' rule) divides positive logits and multiplies negative ones of
    tokens already in the sequence. ``seed`` makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token ``[B]`` from ``logits [B, vocab]``; ``seen [B, vocab]`` marks tokens already in each
    sequence (needed only with a repetition penalty)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token once the more likely ones already reach top_p (the most likely always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, -torch.inf))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

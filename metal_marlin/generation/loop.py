"""The generation loop: one prefill of the (left-padded) prompts into a preallocated cache, then one
decode step per token for the whole batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .sampling import SamplingParams, sample_next


def generate_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                    attention_mask: torch.Tensor | None = None, stop_ids: list[int] = (), pad_id: int = 0
                    ) -> Iterator[torch.Tensor]:
    """Yield each step's tokens ``[B]``. A sequence that produced a stop id gets ``pad_id`` afterwards;
    the loop ends when every sequence has stopped or after ``max_new_tokens`` steps."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    if max_new_tokens == 0:
        return
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    generator = params.generator(device)
    stop = torch.tensor(list(stop_ids), dtype=input_ids.dtype, device=device)
    one = torch.ones(batch, 1, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    with torch.inference_mode():
        cache = model.new_cache(batch, prompt_len + max_new_tokens)
        logits = model(input_ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids, mask)
        for step in range(max_new_tokens):
            token = sample_next(logits, params, seen, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            yield token
            finished |= torch.isin(token, stop)
            if step + 1 == max_new_tokens or bool(finished.all()):  # the one host read per step
                return
            if seen is not None:
                seen.scatter_(1, token.unsqueeze(1), True)
            logits = model(token.unsqueeze(1), attention_mask=one, cache=cache, logits_to_keep=1)[:, -1]

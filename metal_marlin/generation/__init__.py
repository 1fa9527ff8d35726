"""Sampling and the token-by-token generation loop, for any model with ``new_cache(batch, max_len)`` and
``forward(input_ids, attention_mask=, cache=, logits_to_keep=)`` (``TrellisForCausalLM``)."""

from .loop import generate_tokens
from .sampling import SamplingParams, sample_next
from .text import stream_text

__all__ = ["SamplingParams", "generate_tokens", "sample_next", "stream_text"]

"""Streaming text: generated token ids decoded incrementally with the model's tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def stream_text(model, tokenizer, prompt: str | list[dict[str, str]], max_new_tokens: int = 128,
                **generation: Any) -> Iterator[str]:
    """Yield the text of a reply piece by piece as tokens are generated. ``prompt`` is plain text or chat
    messages (``[{"role": ..., "content": ...}]``, formatted with the tokenizer's chat template).
    ``generation``: ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``,
    ``stop_token_ids`` (see ``TrellisForCausalLM.generate``). Stop tokens are not part of the text; a
    piece is held back while it ends inside a multi-byte character."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    input_ids = torch.tensor([list(ids)], device=model.device)
    stop = set(model.stop_ids(generation.get("stop_token_ids")))
    generated: list[int] = []
    emitted = ""
    for token in model.generate_stream(input_ids, max_new_tokens, **generation):
        token_id = int(token[0])
        if token_id in stop:
            break
        generated.append(token_id)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):]
        emitted = text

"""Quantize-and-compare demo on a small Llama built from a config (no downloads)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from .nn import replace_linear_layers

DEMO_SETTINGS = (
    ("int8", -1), ("int8", 32), ("fp8", 32), ("int4", 128), ("int4", 32), ("fp4", 32), ("int3", 32), ("int2", 32),
)


@dataclass
class DemoRow:
    format: str
    group_size: int
    mib: float
    compression: float
    logit_rel_error: float
    top1_agreement: float
    forward_ms: float


def demo_model(seed: int = 0) -> torch.nn.Module:
    """A 4-layer Llama (hidden 512, MLP 1408, GQA 8/2 heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def run_demo(seq_len: int = 64, seed: int = 0) -> list[DemoRow]:
    """Quantize the demo model with each format and compare its logits with the float32 model's."""
    model = demo_model(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits.double()
    rows = []
    for fmt, group_size in DEMO_SETTINGS:
        quantized = copy.deepcopy(model)
        summary = replace_linear_layers(quantized, format=fmt, group_size=group_size)
        with torch.no_grad():
            start = time.perf_counter()
            got = quantized(ids).logits.double()
            elapsed = time.perf_counter() - start
        rows.append(DemoRow(
            fmt, group_size, summary.bytes_after / 2**20, summary.compression,
            ((got - ref).norm() / ref.norm()).item(),
            (got.argmax(-1) == ref.argmax(-1)).double().mean().item(), 1e3 * elapsed,
        ))
    return rows

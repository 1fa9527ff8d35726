"""Perplexity with the project's reference method (docs/perplexity.md):

non-overlapping windows of ``seq_len`` tokens, each scored independently from position 0 (fresh cache);
the NLL of tokens 1..seq_len-1 of every window, log-softmax in float32; ppl = exp(mean NLL).
The default corpus is gensim 4.4.0's ``test_data/lee_background.cor``: lines stripped, empty ones
dropped, joined with blank lines; tokenized without BOS/special tokens; first 8192 tokens.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import TrellisForCausalLM

CORPUS_PACKAGE = "gensim"
CORPUS_FILE = "test/test_data/lee_background.cor"


def default_corpus_path() -> Path:
    """``lee_background.cor`` inside the installed gensim wheel (read as a file, never imported)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default corpus is not installed; install it with: "
                                "pip install --no-deps gensim==4.4.0")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps gensim==4.4.0")
    return path


def prepare_text(raw: str) -> str:
    """Strip every line, drop empty ones, join the rest with blank lines."""
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())


def load_corpus(path: str | Path | None = None) -> str:
    path = default_corpus_path() if path is None else Path(path)
    return prepare_text(path.read_text(encoding="utf-8"))


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    n_windows: int
    n_targets: int


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_tokens: int = 8192,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` by the documented method (see module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    windows = torch.tensor(ids[: n_windows * seq_len]).reshape(n_windows, seq_len)
    device = next(model.parameters()).device
    batches = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    total = torch.zeros((), dtype=torch.float64)
    for start in batches:
        batch = windows[start : start + batch_size].to(device)
        logits = _logits(model, batch)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.double().cpu()
    n_targets = n_windows * (seq_len - 1)
    mean = (total / n_targets).item()
    return PerplexityResult(math.exp(mean), mean, n_windows, n_targets)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of our runtime or of a transformers model."""
    if isinstance(model, TrellisForCausalLM):
        return model(ids)
    return model(ids, use_cache=False).logits

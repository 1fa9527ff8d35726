"""Models: our runtime ``TrellisForCausalLM``, loading our checkpoints and GGUF files, and the
transformers integration.

Importing this package registers the ``metal_marlin`` quantization method with transformers.
"""

from . import hf_quantizer  # noqa: F401  (registers the quantization method with transformers)
from .causal_lm import TrellisForCausalLM, load_model, load_quantized_model
from .checkpoint import CheckpointError, load_transformers_checkpoint, read_quantization_config, save_quantized
from .gguf import GGUFImportError, GGUFModel, read_gguf
from .loading import load_transformers_model

__all__ = [
    "CheckpointError",
    "GGUFImportError",
    "GGUFModel",
    "TrellisForCausalLM",
    "load_model",
    "load_quantized_model",
    "load_transformers_checkpoint",
    "load_transformers_model",
    "read_gguf",
    "read_quantization_config",
    "save_quantized",
]

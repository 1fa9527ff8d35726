"""Models: loading our checkpoints and GGUF files, and the transformers integration.

Importing this package registers the ``metal_marlin`` quantization method with transformers.
"""

from . import hf_quantizer  # noqa: F401  (registers the quantization method with transformers)
from .checkpoint import CheckpointError, load_quantized_model, read_quantization_config, save_quantized
from .gguf import GGUFImportError, GGUFModel, read_gguf

__all__ = [
    "CheckpointError",
    "GGUFImportError",
    "GGUFModel",
    "load_quantized_model",
    "read_gguf",
    "read_quantization_config",
    "save_quantized",
]

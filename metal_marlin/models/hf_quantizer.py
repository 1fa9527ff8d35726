"""transformers integration: ``AutoModelForCausalLM.from_pretrained(checkpoint)`` on a metal-marlin checkpoint.

Importing ``metal_marlin`` registers the ``metal_marlin`` quantization method. Before transformers loads
the weights, the quantizer swaps the modules named in the checkpoint's ``quantization_config`` for
empty quantized modules; transformers' loader then fills their ``packed/scales/offsets`` buffers.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import QUANT_METHOD, install_quantized_modules, share_tied_weights, validate_quantization_config


@register_quantization_config(QUANT_METHOD)
class MetalMarlinConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a metal-marlin checkpoint (see docs/formats.md)."""

    def __init__(
        self,
        format_version: int,
        modules: dict[str, dict[str, Any]],
        default: dict[str, Any] | None = None,
        dense_modules: list[str] | None = None,
        quantizer: dict[str, Any] | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.default = default or {}
        self.modules = modules
        self.dense_modules = dense_modules or []
        self.quantizer = quantizer or {}
        validate_quantization_config(self.to_dict(), "quantization_config")


@register_quantizer(QUANT_METHOD)
class MetalMarlinHfQuantizer(HfQuantizer):
    """Loads pre-quantized metal-marlin checkpoints; quantizing on the fly is done by
    ``metal_marlin.replace_linear_layers`` instead."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("metal_marlin checkpoints are loaded pre-quantized; to quantize a model use "
                             "metal_marlin.replace_linear_layers or `metal-marlin quantize`")

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, **kwargs: Any) -> None:
        install_quantized_modules(model, self.quantization_config.to_dict(), "meta")

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        share_tied_weights(model, self.quantization_config.to_dict())

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False

"""Module state for one group-quantized weight: packed codes, scales and offsets as buffers."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import GroupQuantizedWeight, get_format, n_groups, resolve_group_size


class QuantizedWeightBuffers(nn.Module):
    """Holds a quantized weight of logical shape ``[..., N, K]`` as buffers ``packed/scales/offsets``.

    The buffers are allocated at construction with their final shapes, so an empty module can
    ``load_state_dict`` a saved one.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        format: str = "int4",
        group_size: int = 128,
        symmetric: bool | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        fmt = get_format(format)
        self.name = name
        self.shape = tuple(shape)
        self.format = fmt.name
        self.group_size = resolve_group_size(group_size, shape[-1], name or type(self).__name__)
        self.symmetric = fmt.default_symmetric if symmetric is None else symmetric
        if not self.symmetric and not fmt.supports_asymmetric:
            raise ValueError(f"{name or type(self).__name__}: format {fmt.name} has no asymmetric variant")
        *lead, n, k = shape
        scale_shape = (*lead, n, n_groups(k, self.group_size))
        self.register_buffer("packed", torch.zeros(*lead, *fmt.packed_shape(n, k), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float16, device=device))
        offsets = None if self.symmetric else torch.zeros(scale_shape, dtype=torch.float16, device=device)
        self.register_buffer("offsets", offsets)

    def load_quantized(self, qw: GroupQuantizedWeight) -> None:
        """Copy a quantized weight of matching layout into the buffers."""
        mine = (self.shape, self.format, self.group_size, self.symmetric)
        theirs = (tuple(qw.shape), qw.format.name, qw.group_size, qw.symmetric)
        if mine != theirs:
            raise ValueError(f"{self.name or type(self).__name__}: cannot load {theirs} into {mine} "
                             "(shape, format, group_size, symmetric)")
        self.packed.copy_(qw.packed)
        self.scales.copy_(qw.scales)
        if qw.offsets is not None:
            self.offsets.copy_(qw.offsets)

    def share_weight(self, owner: QuantizedWeightBuffers) -> None:
        """Use ``owner``'s tensors (a tied weight, held once). They stay in ``owner``'s state dict only, so
        a checkpoint stores them once; after a loader assigns new tensors to ``owner``, share again."""
        mine = (self.shape, self.format, self.group_size, self.symmetric)
        theirs = (owner.shape, owner.format, owner.group_size, owner.symmetric)
        if mine != theirs:
            raise ValueError(f"{self.name or type(self).__name__}: cannot share the weight of "
                             f"{owner.name or type(owner).__name__}: {theirs} differs from {mine} "
                             "(shape, format, group_size, symmetric)")
        for key in ("packed", "scales", "offsets"):
            self.register_buffer(key, getattr(owner, key), persistent=False)

    def shares_weight_of(self, owner: QuantizedWeightBuffers) -> bool:
        return self.packed is owner.packed and self.scales is owner.scales and self.offsets is owner.offsets

    @property
    def borrows_weight(self) -> bool:
        """True after ``share_weight``: the tensors are saved with their owner, not with this module."""
        return "packed" in self._non_persistent_buffers_set

    @property
    def quantized_weight(self) -> GroupQuantizedWeight:
        return GroupQuantizedWeight(get_format(self.format), self.shape, self.packed, self.scales,
                                    self.offsets, self.group_size)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense float32 weight (for inspection and export; forwards never build it)."""
        return self.quantized_weight.dequantize(torch.float32)

    def format_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"format={self.format}, group_size={self.group_size}, {kind}, "
                f"{self.quantized_weight.bits_per_weight:.3f} bits/weight")

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.format_repr()}"

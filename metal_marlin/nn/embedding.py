"""``QuantizedEmbedding``: a drop-in ``nn.Embedding`` whose table is group-quantized.

A lookup dequantizes only the rows it reads. A tied output head (``tied_linear``) is a
``MetalQuantizedLinear`` over the same ``packed/scales/offsets`` tensors, so the model holds the
table once, in memory and in a checkpoint.
"""

from __future__ import annotations

import torch

from ..formats import GroupQuantizedWeight, get_format
from .buffers import QuantizedWeightBuffers
from .linear import MetalQuantizedLinear


class QuantizedEmbedding(QuantizedWeightBuffers):
    """``forward(input_ids)`` returns ``dequant(W)[input_ids]`` (``[*input_ids.shape, embedding_dim]``,
    in ``dtype``) with W ``[num_embeddings, embedding_dim]`` quantized along the embedding dimension.

    Build one with :meth:`from_quantized`, or construct an empty one and ``load_state_dict`` into it.
    ``name`` (the qualified module name) prefixes every error.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        format: str = "int8",
        group_size: int = 32,
        symmetric: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__((num_embeddings, embedding_dim), format, group_size, symmetric, device, name)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    @classmethod
    def from_quantized(
        cls, qw: GroupQuantizedWeight, dtype: torch.dtype = torch.float32, name: str = ""
    ) -> QuantizedEmbedding:
        """Wrap an already quantized table ``[num_embeddings, embedding_dim]`` (e.g. a GGUF Q8_0 one)."""
        if len(qw.shape) != 2:
            raise ValueError(f"{name or cls.__name__}: an embedding table is 2-D [num_embeddings, "
                             f"embedding_dim], got shape {tuple(qw.shape)}")
        mod = cls(*qw.shape, format=qw.format.name, group_size=qw.group_size, symmetric=qw.symmetric,
                  dtype=dtype, device=qw.packed.device, name=name)
        mod.load_quantized(qw)
        return mod

    def tied_linear(self, name: str = "") -> MetalQuantizedLinear:
        """The output head ``x @ dequant(W).T`` (no bias) reading this table's tensors (no copy)."""
        head = MetalQuantizedLinear(self.embedding_dim, self.num_embeddings, bias=False, format=self.format,
                                    group_size=self.group_size, symmetric=self.symmetric, device="meta",
                                    name=name)
        head.share_weight(self)
        return head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        label = self.name or type(self).__name__
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"{label}: token ids must be an integer tensor, got {input_ids.dtype}")
        flat = input_ids.reshape(-1)
        try:
            # index_select (unlike indexing) rejects negative ids instead of wrapping around.
            rows = [None if t is None else t.index_select(0, flat) for t in (self.packed, self.scales, self.offsets)]
        except IndexError as err:
            bad = flat[(flat < 0) | (flat >= self.num_embeddings)]
            raise IndexError(f"{label}: token id {bad[0].item()} is out of range for an embedding of "
                             f"{self.num_embeddings} rows") from err
        picked = GroupQuantizedWeight(get_format(self.format), (flat.numel(), self.embedding_dim), *rows,
                                      self.group_size)
        return picked.dequantize(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, dtype={self.dtype}, "
                f"{self.format_repr()}")

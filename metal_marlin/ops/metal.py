"""Metal launches: what a kernel of ``shaders/`` needs from the host, and their dispatch on PyTorch's MPS
stream through ``_core.metal`` (macOS builds, ``_core.has_metal()``).

An op's MPS kernel (``*_metal`` beside the op) builds its :class:`Launch` list (kernel host name, grid,
buffers, parameter struct) with a plan function (``*_launches``) and calls :func:`dispatch`. Both take
tensors on any device, so the tests run the MPS kernels on CPU tensors with ``dispatch`` routed to the
MSL simulator (tests/metal/test_launch_plans.py); what only a Mac runs is the generic encoder in
csrc/metal/metal_runtime.mm.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from .. import _core

# Device-buffer offsets must be aligned to the type a kernel loads (at most 16 bytes: a half8 or float4).
BUFFER_ALIGNMENT = 16
_STRUCT_CODES = {"uint": "I", "int": "i", "float": "f"}


@dataclass(frozen=True)
class ParamsStruct:
    """A kernel parameter struct of 32-bit fields, declared in the same order as in its shader header
    (tests/metal/test_dispatch_names.py checks the two agree)."""

    name: str
    fields: tuple[tuple[str, str], ...]  # (MSL type: "uint" | "int" | "float", field name)

    def pack(self, **values: float) -> bytes:
        """The struct's bytes (C layout: 32-bit fields have no padding); every field must be given."""
        names = [name for _, name in self.fields]
        if sorted(values) != sorted(names):
            raise TypeError(f"{self.name} takes the fields {names}, got {sorted(values)}")
        codes = "".join(_STRUCT_CODES[kind] for kind, _ in self.fields)
        return struct.pack("<" + codes, *(values[name] for name in names))


@dataclass(frozen=True)
class Launch:
    """One ``dispatchThreadgroups`` of kernel ``kernel``: ``grid`` threadgroups of ``threadgroup``
    threads; ``buffers`` and ``constants`` (packed parameter structs) keyed by ``[[buffer(i)]]``,
    ``threadgroup_memory`` bytes keyed by ``[[threadgroup(i)]]``."""

    kernel: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    buffers: dict[int, torch.Tensor]
    constants: dict[int, bytes]
    threadgroup_memory: dict[int, int] = field(default_factory=dict)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def metal_input(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a kernel input: contiguous, of ``dtype``, starting at an aligned byte offset of its
    storage (a copy only when one of these does not hold already)."""
    t = t.to(dtype).contiguous()
    if (t.storage_offset() * t.element_size()) % BUFFER_ALIGNMENT:
        t = t.clone()
    return t


def _buffer_binding(index: int, t: torch.Tensor, kernel: str) -> tuple[int, int, int, int]:
    """``(index, MTLBuffer id, byte offset, bytes)`` of an MPS tensor: for MPS storage, torch's data
    pointer is the id of the MTLBuffer itself (ATen's getMTLBufferStorage reads it the same way)."""
    offset = t.storage_offset() * t.element_size()
    if t.device.type != "mps" or not t.is_contiguous() or offset % BUFFER_ALIGNMENT:
        raise ValueError(f"{kernel}: buffer {index} must be a contiguous MPS tensor at a byte offset that is a "
                         f"multiple of {BUFFER_ALIGNMENT}, got device {t.device}, contiguous={t.is_contiguous()}, "
                         f"offset {offset}")
    return index, t.untyped_storage().data_ptr(), offset, t.numel() * t.element_size()


def dispatch(launches: list[Launch]) -> None:
    """Encode the launches, in order, on PyTorch's MPS stream (no commit, no wait: later MPS work is
    ordered after them). The tensors must stay alive until the call returns; the caching allocator
    then keeps their memory safe for the queued work."""
    _core.metal.dispatch([
        (launch.kernel, launch.grid, launch.threadgroup,
         [_buffer_binding(i, t, launch.kernel) for i, t in launch.buffers.items()],
         list(launch.constants.items()), list(launch.threadgroup_memory.items()))
        for launch in launches
    ])

"""Running kernels of a compiled library: buffers, schedules, one runner process per launch, comparison.

A launch writes a request (runtime/mslsim_run.h) and the input bytes into an anonymous shared file, then
starts the runner executable, which loads the kernel library, runs every schedule and writes each
schedule's results (or an error message) back into the file. A kernel that faults or hangs only takes the
runner down; spawning it costs the same whatever the size of the calling process.
"""

import ctypes
import mmap
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .build import build, runner
from .errors import MslRuntimeError
from .kernels import Kernel

SCHEDULES = ("forward", "reverse", "random", "runahead")
RANDOM_SEED = 0x5EED
MAX_SLOTS = 32
ALIGN = 64


class _RequestBuffer(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_int),
        ("unused", ctypes.c_int),
        ("input", ctypes.c_ulong),
        ("size", ctypes.c_ulong),
        ("result", ctypes.c_ulong * len(SCHEDULES)),
    ]


class _Request(ctypes.Structure):
    _fields_ = [
        ("error", ctypes.c_char * 8192),
        ("progress", ctypes.c_long),
        ("kernel", ctypes.c_int),
        ("nschedules", ctypes.c_int),
        ("schedules", ctypes.c_int * len(SCHEDULES)),
        ("grid", ctypes.c_uint * 3),
        ("threads", ctypes.c_uint * 3),
        ("nbuffers", ctypes.c_int),
        ("unused", ctypes.c_int),
        ("threadgroup_memory", ctypes.c_ulong * MAX_SLOTS),
        ("seed", ctypes.c_ulonglong),
        ("buffers", _RequestBuffer * MAX_SLOTS),
    ]


def _dims(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int | np.integer) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(d, int | np.integer) or d < 1 for d in dims):
        raise MslRuntimeError(f"{what} must be 1 to 3 positive integers, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _as_array(slot: int, value: object) -> tuple[np.ndarray, np.ndarray | None]:
    """The bytes bound to buffer(slot), and the array that receives the results (None for values)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or not value.is_contiguous():
            raise MslRuntimeError(f"buffer({slot}): tensors must be contiguous CPU tensors")
        value = value.detach().numpy()
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise MslRuntimeError(f"buffer({slot}): arrays must be C-contiguous")
        return value.reshape(-1).view(np.uint8), value if value.flags.writeable else None
    if isinstance(value, np.generic):
        return np.frombuffer(np.asarray(value).tobytes(), np.uint8), None
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(bytes(value), np.uint8), None
    raise MslRuntimeError(
        f"buffer({slot}): expected a numpy array, a CPU tensor, a numpy scalar or bytes, got {type(value).__name__} "
        "(bind scalars with an explicit type, e.g. np.uint32(n))"
    )


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class Library:
    """The kernels of one compiled .metal file."""

    def __init__(self, source: Path, shared_object: Path, kernels: list[Kernel]):
        self.source = source
        self.shared_object = shared_object
        self._kernels = {k.host_name: (i, k) for i, k in enumerate(kernels)}

    @property
    def kernel_names(self) -> list[str]:
        """Host names of every kernel, including template instantiations."""
        return list(self._kernels)

    def run(
        self,
        kernel: str,
        grid: int | Sequence[int],
        threadgroup: int | Sequence[int],
        buffers: Mapping[int, object],
        threadgroup_memory: Mapping[int, int] | None = None,
        schedule: str = "all",
        timeout: float = 60.0,
    ) -> None:
        """Dispatch ``grid`` threadgroups of ``threadgroup`` threads; write results back into the arrays.

        ``buffers`` maps [[buffer(i)]] indices to arrays/CPU tensors (device memory, written back in place) or
        numpy scalars/bytes (constant values). With schedule "all", every schedule runs from fresh copies of
        the inputs and all results must agree bit for bit. Raises MslRuntimeError naming the kernel for
        faults, races, divergence, deadlocks and launch mistakes.
        """
        if kernel not in self._kernels:
            raise MslRuntimeError(f"{self.source.name} has no kernel {kernel!r}; it has {self.kernel_names}")
        if schedule != "all" and schedule not in SCHEDULES:
            raise MslRuntimeError(f"unknown schedule {schedule!r}; use one of {SCHEDULES} or 'all'")
        schedules = SCHEDULES if schedule == "all" else (schedule,)
        request = _Request()
        request.kernel = self._kernels[kernel][0]
        request.nschedules = len(schedules)
        request.schedules[:] = [SCHEDULES.index(s) for s in schedules] + [0] * (len(SCHEDULES) - len(schedules))
        request.grid[:] = _dims(grid, "grid")
        request.threads[:] = _dims(threadgroup, "threadgroup")
        request.seed = RANDOM_SEED
        for slot, size in (threadgroup_memory or {}).items():
            if not 0 <= slot < MAX_SLOTS or size <= 0 or size % 16:
                raise MslRuntimeError(
                    f"threadgroup_memory[{slot}] = {size}: Metal needs a positive multiple of 16 bytes at index 0..31"
                )
            request.threadgroup_memory[slot] = size

        bound = {}
        for slot in sorted(buffers):
            if not 0 <= slot < MAX_SLOTS:
                raise MslRuntimeError(f"buffer index {slot} is outside 0..{MAX_SLOTS - 1}")
            bound[slot] = _as_array(slot, buffers[slot])
        request.nbuffers = len(bound)
        offset = _aligned(ctypes.sizeof(_Request))
        for k, (slot, (data, _)) in enumerate(bound.items()):
            entry = request.buffers[k]
            entry.slot, entry.size, entry.input = slot, data.nbytes, offset
            offset = _aligned(offset + data.nbytes)
            for s in range(len(schedules)):
                entry.result[s] = offset
                offset = _aligned(offset + data.nbytes)

        if not self.shared_object.exists():  # build/mslsim was cleaned meanwhile
            self.shared_object, _ = build(self.source)
        fd = os.memfd_create("mslsim")
        try:
            os.ftruncate(fd, offset)
            with mmap.mmap(fd, offset) as shared:
                shared[: ctypes.sizeof(request)] = bytes(request)
                for k, (data, _) in enumerate(bound.values()):
                    start = request.buffers[k].input
                    shared[start : start + data.nbytes] = data.tobytes()
                self._launch(self._kernels[kernel][1], schedules, fd, shared, timeout)
                results = {
                    slot: [
                        np.frombuffer(shared, np.uint8, data.nbytes, request.buffers[k].result[s]).copy()
                        for s in range(len(schedules))
                    ]
                    for k, (slot, (data, _)) in enumerate(bound.items())
                }
        finally:
            os.close(fd)
        for slot, (_, target) in bound.items():
            if target is not None:
                _compare(kernel, slot, target, schedules, results[slot])
        for slot, (_, target) in bound.items():
            if target is not None:
                target.reshape(-1).view(np.uint8)[:] = results[slot][0]

    def _launch(self, kernel: Kernel, schedules: Sequence[str], fd: int, shared: mmap.mmap, timeout: float) -> None:
        process = subprocess.Popen(
            [str(runner()), str(self.shared_object), str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            timed_out = True
        finally:
            if process.poll() is None:  # interrupted: do not leave the runner behind
                process.kill()
                process.wait()
        request = _Request.from_buffer_copy(shared[: ctypes.sizeof(_Request)])
        running = schedules[request.progress] if 0 <= request.progress < len(schedules) else "?"
        prefix = f"kernel {kernel.host_name!r} ({kernel.location}, schedule {running})"
        message = request.error.decode(errors="replace") or stderr.decode(errors="replace").strip()
        if timed_out:
            raise MslRuntimeError(
                f"{prefix}: no result after {timeout:g} s: deadlock or endless loop (e.g. a spin-wait on memory "
                "that another thread or threadgroup never writes)"
            )
        if process.returncode < 0:
            raise MslRuntimeError(f"{prefix}: the runner died with signal {-process.returncode}. {message}")
        if process.returncode != 0:
            raise MslRuntimeError(f"{prefix}: {message or f'the runner failed with status {process.returncode}'}")


def _compare(kernel: str, slot: int, target: np.ndarray, schedules: Sequence[str], results: list[np.ndarray]) -> None:
    """Raise if any schedule's result for buffer(slot) differs in any bit from the first schedule's."""
    for name, result in zip(schedules[1:], results[1:], strict=True):
        if np.array_equal(results[0], result):
            continue
        a = results[0].view(target.dtype).reshape(target.shape)
        b = result.view(target.dtype).reshape(target.shape)
        per_element = (results[0] != result).reshape(max(1, a.size), -1).any(axis=1)
        differ = np.flatnonzero(per_element)
        first = tuple(int(i) for i in np.unravel_index(differ[0], target.shape)) if target.shape else ()
        raise MslRuntimeError(
            f"kernel {kernel!r}: buffer({slot}) differs between schedules {schedules[0]!r} and {name!r} in "
            f"{differ.size} of {a.size} elements, first at index {first}: {a[first]!r} vs {b[first]!r}. A race: "
            "a missing threadgroup_barrier, threadgroups writing the same memory, or a read of uninitialised "
            "(poisoned) threadgroup memory"
        )

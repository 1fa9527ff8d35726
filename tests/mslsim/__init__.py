"""The MSL simulator: compiles Metal Shading Language kernels with clang as C++ and runs them on the CPU.

    from tests.mslsim import compile_metal
    lib = compile_metal("shaders/quant_gemv.metal")
    lib.run("gemv_int4", grid=(gx, gy, gz), threadgroup=(tx, ty, tz), buffers={0: x, 1: w, 2: out})

See tests/mslsim/README.md for what is modelled and what is not.
"""

from pathlib import Path

from .build import build
from .errors import MslCompileError, MslError, MslRuntimeError
from .launch import SCHEDULES, Library

__all__ = ["SCHEDULES", "Library", "MslCompileError", "MslError", "MslRuntimeError", "compile_metal"]

_libraries: dict[Path, Library] = {}


def compile_metal(path: str | Path) -> Library:
    """Compile the .metal file at ``path`` (or reuse the cached build of identical sources)."""
    source = Path(path).resolve()
    shared_object, kernels = build(source)
    if shared_object not in _libraries:
        _libraries[shared_object] = Library(source, shared_object, kernels)
    return _libraries[shared_object]

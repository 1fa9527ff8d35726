"""Compiling a .metal file into a simulator library (a shared object), cached by content hash."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from .errors import MslCompileError
from .kernels import Kernel, Param, find_kernels, launcher_source
from .rewrite import rewrite

COMPILER = "clang++-19"
PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
RUNTIME_DIR = PACKAGE_DIR / "runtime"
RUNTIME_SOURCE = RUNTIME_DIR / "runtime.cpp"
RUNNER_SOURCE = RUNTIME_DIR / "runner.cpp"
CACHE_DIR = PACKAGE_DIR.parent.parent / "build" / "mslsim"

COMMON_FLAGS = ("-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-exceptions", "-fno-rtti")
KERNEL_FLAGS = COMMON_FLAGS + (
    "-nostdinc",
    "-nostdinc++",
    "-Xclang",
    "-ffloat16-excess-precision=none",  # round every half operation to half, as the GPU does
    "-ffp-contract=off",  # no fused multiply-add unless the shader asks for fma()
    "-ftrivial-auto-var-init=pattern",  # uninitialised thread locals hold a recognisable pattern
    "-fstack-clash-protection",  # a large frame touches every page, so a stack overflow hits the guard page
    "-Werror=uninitialized",
    "-Werror=sometimes-uninitialized",
    "-Werror=return-type",
    "-Wno-unknown-attributes",
    "-Wno-duplicate-decl-specifier",
    "-ferror-limit=20",
)


@cache
def _compiler_version() -> str:
    if shutil.which(COMPILER) is None:
        raise MslCompileError(
            f"the MSL simulator needs {COMPILER} (Debian/Ubuntu: apt-get install clang-19), which is not on PATH"
        )
    return subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True).stdout


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _simulator_files() -> list[Path]:
    """Everything whose change must invalidate compiled libraries."""
    return sorted(INCLUDE_DIR.iterdir()) + sorted(RUNTIME_DIR.iterdir()) + sorted(PACKAGE_DIR.glob("*.py"))


def _local_includes(path: Path, main_dir: Path, seen: dict[Path, bytes]) -> None:
    """``path`` and every file it includes with ``#include "..."``: next to the including file or the main one."""
    if path in seen:
        return
    data = path.read_bytes()
    seen[path] = data
    for m in re.finditer(rb'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', data, re.M):
        for directory in (path.parent, main_dir):
            included = (directory / m.group(1).decode()).resolve()
            if included.is_file():
                _local_includes(included, main_dir, seen)
                break


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        # "In file included from <build dir>/unit.cpp" names a temporary file, not the shader.
        lines = [line for line in result.stderr.splitlines() if not line.endswith("unit.cpp:1:")]
        raise MslCompileError(f"{what} failed:\n" + "\n".join(lines).strip())
    return result.stdout


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; another process may have published the same one meanwhile."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@cache
def _key(source: Path, flags: tuple[str, ...]) -> str:
    headers = [(RUNTIME_DIR / "mslsim_run.h").read_bytes(), (INCLUDE_DIR / "mslsim_abi.h").read_bytes()]
    return _digest(_compiler_version().encode(), " ".join(flags).encode(), source.read_bytes(), *headers)


def _built(name: str, suffix: str, source: Path, flags: tuple[str, ...]) -> Path:
    """``source`` compiled with ``flags`` into build/mslsim/<name>-<hash><suffix>, once per content."""
    target = CACHE_DIR / f"{name}-{_key(source, flags)[:16]}{suffix}"
    if not target.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_DIR / f"tmp-{os.getpid()}-{target.name}"
        _run([COMPILER, *flags, "-I", str(INCLUDE_DIR), "-I", str(RUNTIME_DIR), str(source), "-o", str(tmp)],
             f"compiling {source.name}")
        _publish(tmp, target)
    return target


def runtime_object() -> Path:
    """The simulator runtime, linked into every kernel library."""
    return _built("runtime", ".o", RUNTIME_SOURCE, (*COMMON_FLAGS, "-O2", "-c"))


def runner() -> Path:
    """The executable that runs one launch in its own process."""
    return _built("runner", "", RUNNER_SOURCE, (*COMMON_FLAGS, "-O2", "-ldl"))


def build(path: Path) -> tuple[Path, list[Kernel]]:
    """The shared object for the .metal file ``path`` and its kernels, compiling it unless cached."""
    path = path.resolve()
    if not path.is_file():
        raise MslCompileError(f"{path}: no such file")
    sources: dict[Path, bytes] = {}
    _local_includes(path, path.parent, sources)
    runtime = runtime_object()
    parts = [_compiler_version().encode(), " ".join(KERNEL_FLAGS).encode(), str(path).encode()]
    parts += [f.read_bytes() for f in _simulator_files()]
    for source_path in sorted(sources):
        parts += [str(source_path).encode(), sources[source_path]]
    key = _digest(*parts)
    final = CACHE_DIR / f"{path.stem}-{key[:20]}"
    if not (final / "kernels.json").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{path.stem}-", dir=CACHE_DIR))
        try:
            _compile(path, sources, runtime, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, final)
    listed = json.loads((final / "kernels.json").read_text())
    kernels = [Kernel(**{**k, "params": tuple(Param(**p) for p in k["params"])}) for k in listed]
    return final / "kernels.so", kernels


def _compile(path: Path, sources: dict[Path, bytes], runtime: Path, out: Path) -> None:
    # Rewritten copies keep their absolute paths under out/src, so relative includes find each other.
    for source_path, data in sources.items():
        copy = out / "src" / source_path.relative_to(source_path.anchor)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(rewrite(data.decode(), str(source_path)))
    main = out / "src" / path.relative_to(path.anchor)
    include = ["-I", str(INCLUDE_DIR), "-I", str(main.parent)]
    preprocessed = _run(
        [COMPILER, "-E", *KERNEL_FLAGS, "-DMSLSIM_PARSE", *include, "-x", "c++", str(main)],
        f"preprocessing {path}",
    )
    kernels = find_kernels(preprocessed, INCLUDE_DIR)
    unit = out / "unit.cpp"
    unit.write_text(f'#include "{main}"\n' + launcher_source(kernels))
    _run(
        [COMPILER, *KERNEL_FLAGS, *include, "-shared", "-o", str(out / "kernels.so"), str(unit), str(runtime)],
        f"compiling {path}",
    )
    (out / "kernels.json").write_text(json.dumps([dataclasses.asdict(k) for k in kernels], indent=1))

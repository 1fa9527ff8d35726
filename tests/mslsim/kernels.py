"""Finds the kernels of a preprocessed MSL translation unit and generates the C++ that launches them.

Kernels are plain ``kernel void f(...)`` / ``[[kernel]] void f(...)`` definitions (host name ``f`` or its
``[[host_name]]``) and explicit instantiations of kernel templates,
``template [[host_name("x")]] [[kernel]] decltype(f<A, B>) f<A, B>;`` (or with the full signature instead of
``decltype``). The parser reads the preprocessor's output, so macro-generated instantiations are found; it
sees the markers ``__mslsim_host_name(...)`` and ``__mslsim_kernel`` that the rewriter put in place of the
attributes. Parameter types come from the compiler (the launcher deduces them from the function pointer);
the parser only reads the binding attributes.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MslCompileError
from .rewrite import mask_source, matching_bracket, split_top_level

# In the order of the Builtin enum in include/mslsim_abi.h.
BUILTINS = (
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "threads_per_simdgroup",
    "thread_execution_width",
    "dispatch_simdgroups_per_threadgroup",
    "thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
)


@dataclass(frozen=True)
class Param:
    kind: str  # "buffer", "threadgroup" or "builtin"
    index: int  # the [[buffer(i)]] / [[threadgroup(i)]] index, or the position in BUILTINS


@dataclass(frozen=True)
class Kernel:
    host_name: str
    function: str  # C++ expression naming the function, e.g. "::gemv<half, 4>"
    params: tuple[Param, ...]
    max_threads: int  # [[max_total_threads_per_threadgroup(n)]], 0 if absent
    location: str  # file:line of the definition or instantiation


@dataclass
class _Definition:
    name: str
    namespace: str
    params: tuple[Param, ...]
    max_threads: int
    host_name: str | None
    is_template: bool
    location: str


_STRINGS = r'(?:"(?:[^"\\]|\\.)*"\s*)+'
_HOST_NAME = r"__mslsim_host_name\s*\(\s*(" + _STRINGS + r")\)"
_ATTRIBUTE = r"\[\[[^\]]*\]\]"


class _Source:
    """The user's part of the preprocessed text (the simulator's headers blanked) with source locations."""

    def __init__(self, preprocessed: str, library_dir: Path):
        lines = preprocessed.split("\n")
        self.locations: list[tuple[str, int]] = []
        kept = []
        file, line = "?", 1
        library = str(library_dir)
        for text in lines:
            marker = re.match(r'#\s*(\d+)\s+"((?:[^"\\]|\\.)*)"', text)
            if marker:
                line, file = int(marker.group(1)), marker.group(2)
                kept.append("")
                self.locations.append((file, line))
                continue
            self.locations.append((file, line))
            kept.append("" if file.startswith(library) or file.startswith("<") else text)
            line += 1
        self.text = "\n".join(kept)
        self.code = mask_source(self.text)

    def location(self, pos: int) -> str:
        index = self.text.count("\n", 0, pos)
        file, line = self.locations[index]
        return f"{file}:{line}"

    def error(self, pos: int, message: str) -> MslCompileError:
        return MslCompileError(f"{self.location(pos)}: error: {message}")

    def matching(self, pos: int, opening: str, closing: str) -> int:
        """Index just past the bracket closing the one at ``pos``."""
        end = matching_bracket(self.code, pos, opening, closing)
        if end is None:
            raise self.error(pos, f"unbalanced '{opening}'")
        return end

    def namespaces(self) -> list[tuple[int, str]]:
        """(position, enclosing namespace path such as "mlx::steel") at every namespace boundary."""
        events = []
        stack: list[str | None] = []
        pending = {m.end() - 1: m.group(1) or "" for m in re.finditer(r"\bnamespace\s+([\w:]*)\s*\{", self.code)}
        for i, c in enumerate(self.code):
            if c == "{":
                stack.append(pending.get(i))
                if i in pending:
                    events.append((i, "::".join(n for n in stack if n)))
            elif c == "}" and stack and stack.pop() is not None:
                events.append((i, "::".join(n for n in stack if n)))
        return events


def _namespace_at(events: list[tuple[int, str]], pos: int) -> str:
    current = ""
    for at, path in events:
        if at > pos:
            break
        current = path
    return current


def _host_name(strings: str) -> str:
    return "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', strings))


def _integer(src: _Source, pos: int, text: str) -> int:
    text = re.sub(r"(?<=\d)[uUlL]+\b", "", text.strip())
    if not re.fullmatch(r"[\d\s+\-*()]+", text):
        raise src.error(pos, f"cannot evaluate the attribute argument '{text}'")
    return int(eval(text, {"__builtins__": {}}))  # digits and + - * ( ) only


def _split_params(text: str) -> list[str]:
    return [p for p in (p.strip() for p in split_top_level(text)) if p and p != "void"]


def _params(src: _Source, pos: int, text: str, kernel: str) -> tuple[Param, ...]:
    params = []
    for param in _split_params(text):
        bindings = []
        for m in re.finditer(r"\[\[\s*(\w+)\s*(?:\(([^)]*)\))?\s*\]\]", param):
            name, argument = m.group(1), m.group(2)
            if name in ("buffer", "__mslsim_threadgroup"):
                bindings.append(Param(name.removeprefix("__mslsim_"), _integer(src, pos, argument or "")))
            elif name in BUILTINS:
                bindings.append(Param("builtin", BUILTINS.index(name)))
            else:
                raise src.error(pos, f"kernel {kernel}: the simulator does not support [[{name}]] ({param})")
        if len(bindings) != 1:
            raise src.error(pos, f"kernel {kernel}: parameter '{param}' needs exactly one binding attribute")
        params.append(bindings[0])
    slots = [(p.kind, p.index) for p in params if p.kind != "builtin"]
    if len(set(slots)) != len(slots):
        raise src.error(pos, f"kernel {kernel}: two parameters bind the same index")
    return tuple(params)


def _max_threads(src: _Source, pos: int, attributes: str) -> int:
    m = re.search(r"\[\[\s*max_total_threads_per_threadgroup\s*\(([^)]*)\)\s*\]\]", attributes)
    return _integer(src, pos, m.group(1)) if m else 0


def _definitions(src: _Source, namespaces: list[tuple[int, str]]) -> list[_Definition]:
    found = []
    for m in re.finditer(r"\b(?:kernel|__mslsim_kernel)\s+void\s+([A-Za-z_]\w*)\s*\(", src.code):
        name = m.group(1)
        close = src.matching(m.end() - 1, "(", ")")
        if not re.match(r"\s*\{", src.code[close:]):
            continue  # a declaration; the definition is elsewhere
        prefix = re.search(
            r"(template\s*<[^;{}]*>\s*)?((?:" + _HOST_NAME + "|" + _ATTRIBUTE + r"|\s)*)$",
            src.code[max(0, m.start() - 2000) : m.start()],
        )
        attributes = src.text[m.start() - len(prefix.group(2)) : m.start()] if prefix else ""
        host = re.search(_HOST_NAME, attributes)
        found.append(
            _Definition(
                name=name,
                namespace=_namespace_at(namespaces, m.start()),
                params=_params(src, m.start(), src.text[m.end() : close - 1], name),
                max_threads=_max_threads(src, m.start(), attributes),
                host_name=_host_name(host.group(1)) if host else None,
                is_template=bool(prefix and prefix.group(1)),
                location=src.location(m.start()),
            )
        )
    return found


def _qualified(namespace: str, name: str) -> str:
    return f"::{namespace}::{name}" if namespace else f"::{name}"


def find_kernels(preprocessed: str, library_dir: Path) -> list[Kernel]:
    """The kernels defined or instantiated in ``preprocessed`` (clang -E output of a rewritten file)."""
    src = _Source(preprocessed, library_dir)
    namespaces = src.namespaces()
    definitions = _definitions(src, namespaces)
    kernels = [
        Kernel(d.host_name or d.name, _qualified(d.namespace, d.name), d.params, d.max_threads, d.location)
        for d in definitions
        if not d.is_template
    ]
    templates = {d.name: d for d in definitions if d.is_template}
    head = r"\btemplate\s+((?:" + _HOST_NAME + r"|__mslsim_kernel|kernel|" + _ATTRIBUTE + r"|\s)*)"
    for m in re.finditer(head, src.code):
        attributes = src.text[m.start(1) : m.end(1)]
        host = re.search(_HOST_NAME, attributes)
        is_kernel = re.search(r"\b(?:__mslsim_kernel|kernel)\b", attributes) is not None
        if not host:
            if is_kernel:
                raise src.error(m.start(), "a kernel instantiation needs [[host_name(\"...\")]]")
            continue
        pos = m.end()
        end = src.code.find(";", pos)
        if end < 0:
            raise src.error(pos, "unterminated explicit instantiation")
        declaration = src.text[pos:end]
        if declaration.lstrip().startswith("decltype"):
            open_paren = src.code.index("(", pos)
            callee = " ".join(src.text[src.matching(open_paren, "(", ")") : end].split())
            params = None
        else:
            signature = re.match(r"\s*void\s+([^(]+?)\s*\(", declaration)
            if not signature:
                raise src.error(pos, "cannot parse this kernel instantiation")
            callee = " ".join(signature.group(1).split())
            open_paren = pos + signature.end() - 1
            params = src.text[open_paren + 1 : src.matching(open_paren, "(", ")") - 1]
        base = callee.split("<")[0].split("::")[-1].strip()
        definition = templates.get(base)
        if params is None and definition is None:
            raise src.error(pos, f"no kernel template named '{base}' for the instantiation '{callee}'")
        kernels.append(
            Kernel(
                host_name=_host_name(host.group(1)),
                function=_qualified(_namespace_at(namespaces, m.start()), callee),
                params=definition.params if params is None else _params(src, pos, params, callee),
                max_threads=definition.max_threads if definition else _max_threads(src, pos, attributes),
                location=src.location(m.start()),
            )
        )
    names = [k.host_name for k in kernels]
    for name in sorted({n for n in names if names.count(n) > 1}):
        places = ", ".join(k.location for k in kernels if k.host_name == name)
        raise MslCompileError(f"two kernels are named {name!r}: {places}")
    return kernels


def launcher_source(kernels: list[Kernel]) -> str:
    """C++ appended to the translation unit: one entry per kernel in the table the runtime reads."""
    kinds = {"buffer": "param_buffer", "threadgroup": "param_threadgroup", "builtin": "param_builtin"}
    lines = ["", "// Generated by tests/mslsim/kernels.py.", "namespace mslsim_launchers {"]
    table = []
    for i, k in enumerate(kernels):
        descs = ", ".join(
            f"{{::mslsim::{kinds[p.kind]}, {f'::mslsim::{BUILTINS[p.index]}' if p.kind == 'builtin' else p.index}}}"
            for p in k.params
        )
        signature = f"::mslsim::kernel_signature<decltype(&{k.function})>"
        lines += [
            f"static const ::mslsim::ParamDesc params_{i}[] = {{{descs or '{0, 0}'}}};",
            f"static void entry_{i}() {{ ::mslsim::invoke(&{k.function}, params_{i}); }}",
            f'static_assert({signature}::count == {len(k.params)}, "mslsim: kernel {k.host_name} has '
            f'{len(k.params)} parameters with binding attributes but a different C++ signature");',
        ]
        table.append(
            f'  {{"{k.host_name}", &mslsim_launchers::entry_{i}, {len(k.params)}, mslsim_launchers::params_{i}, '
            f"{signature}::types, {k.max_threads}u}},"
        )
    lines.append("}  // namespace mslsim_launchers")
    lines.append('extern "C" __attribute__((visibility("default"))) const ::mslsim::Kernel mslsim_kernels[] = {')
    lines += table
    lines.append("  {nullptr, nullptr, 0, nullptr, nullptr, 0u}};")
    lines.append(f'extern "C" __attribute__((visibility("default"))) const int mslsim_kernel_count = {len(kernels)};')
    return "\n".join(lines) + "\n"

"""Line-preserving rewrite of MSL source into C++ that clang compiles with the simulator's metal_stdlib.

What it changes (in code only, never in comments, strings or preprocessor conditions):
- half literals ``1.5h`` -> ``1.5f16``; unsuffixed floating literals ``0.5`` -> ``0.5f`` (MSL has no double);
- functional conversions ``float4(a, b)``, ``vec<T, N>(x)``, ``uint(x)`` -> ``::mslsim::make<...>(...)``, which
  converts element values, splats scalars and concatenates vectors (clang's own cast would reinterpret the
  bits of a same-sized vector), and ``static_cast`` -> ``::mslsim::convert`` for the same reason;
- ``threadgroup T x[N];`` inside a function -> a reference to storage that the whole threadgroup shares;
- ``[[host_name("x")]]`` and ``[[kernel]]`` -> markers that the kernel parser reads after preprocessing
  (C++ does not allow attributes where MSL's explicit instantiations put them), and ``[[threadgroup(i)]]``
  -> ``[[__mslsim_threadgroup(i)]]`` (``threadgroup`` is a macro).
It refuses C-style vector casts such as ``(float4)u``: MSL converts the values, clang would reinterpret bits.

The line count never changes, and the output starts with ``#line 1 "<original path>"``, so clang's
diagnostics point at the .metal file.
"""

import re
import zlib
from dataclasses import dataclass

from .errors import MslCompileError

SCALAR_TYPES = ("bool", "char", "uchar", "short", "ushort", "int", "uint", "long", "ulong", "half", "float")
VECTOR_TYPES = tuple(f"{t}{n}" for t in SCALAR_TYPES for n in (2, 3, 4))
# Scalar functional casts are rewritten too, so that `uint(v)` of a vector `v` is refused, not reinterpreted.
CONVERTIBLE_SCALARS = tuple(t for t in SCALAR_TYPES if t != "bool") + tuple(
    f"{s}int{b}_t" for s in ("", "u") for b in (8, 16, 32, 64)
)
# Statement keywords after which `(type)x` is a cast, not a call.
CAST_PRECEDING_KEYWORDS = ("return", "case", "else", "do")


@dataclass
class _Edit:
    start: int
    end: int
    text: str


def mask_source(source: str) -> str:
    """``source`` with comments, string/char literal contents and non-#define directives blanked out.

    Same length and same newlines, so positions found in the mask are positions in the source.
    """
    out = list(source)
    i, n = 0, len(source)
    at_line_start = True
    while i < n:
        c = source[i]
        if c == "\n":
            at_line_start = True
            i += 1
            continue
        if at_line_start and c in " \t":
            i += 1
            continue
        if at_line_start and c == "#":
            end = i
            while end < n and source[end] != "\n":
                end = end + 2 if source.startswith("\\\n", end) else end + 1
            directive = re.match(r"#\s*(\w+)", source[i:end])
            if not (directive and directive.group(1) == "define"):
                for k in range(i, end):
                    if out[k] != "\n":
                        out[k] = " "
                i = end
                continue
        at_line_start = False
        if source.startswith("//", i):
            while i < n and source[i] != "\n":
                if not source.startswith("\\\n", i):
                    out[i] = " "
                i += 1
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for k in range(i, end):
                if out[k] != "\n":
                    out[k] = " "
            i = end
        elif c in "\"'":
            k = i + 1
            while k < n and source[k] != c and source[k] != "\n":
                if source[k] == "\\":
                    out[k] = " "
                    k += 1
                out[k] = " "
                k += 1
            i = k + 1
        else:
            i += 1
    return "".join(out)


def _line_col(source: str, pos: int) -> tuple[int, int]:
    line = source.count("\n", 0, pos) + 1
    return line, pos - (source.rfind("\n", 0, pos) + 1) + 1


class _Rewriter:
    def __init__(self, source: str, path: str):
        self.source = source
        self.path = path
        self.code = mask_source(source)
        self.edits: list[_Edit] = []
        self.threadgroup_ranges: list[tuple[int, int]] = []  # rewritten declarations; other edits inside drop

    def error(self, pos: int, message: str) -> MslCompileError:
        line, col = _line_col(self.source, pos)
        return MslCompileError(f"{self.path}:{line}:{col}: error: {message}")

    def edit(self, start: int, end: int, text: str) -> None:
        self.edits.append(_Edit(start, end, text))

    def matching(self, pos: int, opening: str, closing: str) -> int:
        """Index just past the bracket closing the one at ``pos``."""
        end = matching_bracket(self.code, pos, opening, closing)
        if end is None:
            raise self.error(pos, f"unbalanced '{opening}'")
        return end

    # --- literals -------------------------------------------------------------------------------------
    def literals(self) -> None:
        number = r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)"
        for m in re.finditer(number + r"[hH](?![\w.])", self.code):
            self.edit(m.start(), m.end(), m.group(1) + "f16")
        floating = r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![\w.])"
        for m in re.finditer(floating, self.code):
            self.edit(m.end(), m.end(), "f")

    # --- vector types -----------------------------------------------------------------------------------
    def vector_aliases(self) -> set[str]:
        """User names for vector types (``typedef vec<T, 4> T4;``, ``using h4 = half4;``)."""
        vector = r"(?:(?:metal::)?vec\s*<[^;]*>|\b(?:" + "|".join(VECTOR_TYPES) + r")\b)"
        names = set()
        for m in re.finditer(r"\btypedef\s+" + vector + r"\s+(\w+)\s*;", self.code):
            names.add(m.group(1))
        for m in re.finditer(r"\busing\s+(\w+)\s*=\s*" + vector + r"\s*;", self.code):
            names.add(m.group(1))
        return names

    def conversions(self, vector_names: set[str]) -> None:
        names = sorted(set(VECTOR_TYPES) | vector_names | set(CONVERTIBLE_SCALARS), key=len, reverse=True)
        pattern = r"(?<![\w.])(?:(?:::)?metal::)?(" + "|".join(names) + r")\s*\((?!\s*[*&])"
        for m in re.finditer(pattern, self.code):
            before = self.code[: m.start()].rstrip()
            if before.endswith("operator") or before.endswith("::") or before.endswith("->"):
                continue
            self.edit(m.start(), m.end(), f"::mslsim::make<{m.group(1)}>(")
        for m in re.finditer(r"(?<![\w.:])(?:metal::)?vec\s*<", self.code):
            close = self.matching(m.end() - 1, "<", ">")
            after = re.match(r"\s*\(", self.code[close:])
            if after:
                type_text = self.source[m.start() : close]
                self.edit(m.start(), close + after.end(), f"::mslsim::make<{type_text}>(")
        for m in re.finditer(r"\bstatic_cast\b", self.code):
            self.edit(m.start(), m.end(), "::mslsim::convert")

    def refuse_vector_casts(self, vector_names: set[str]) -> None:
        names = sorted(set(VECTOR_TYPES) | vector_names, key=len, reverse=True)
        vector = r"(?:(?:metal::)?vec\s*<[^()]*?>|\b(?:" + "|".join(names) + r")\b)"
        for m in re.finditer(r"\(\s*(" + vector + r")\s*\)", self.code):
            before = self.code[: m.start()].rstrip()
            word = re.search(r"(\w+)$", before)
            if word and word.group(1) not in CAST_PRECEDING_KEYWORDS:
                continue  # a call or sizeof/alignof/decltype: the parenthesised type is an argument
            if before.endswith((")", "]")):
                continue
            if re.match(r"\s*[\w(\-+~!*&.{]", self.code[m.end() :]):
                raise self.error(
                    m.start(),
                    f"C-style cast to the vector type '{m.group(1)}': clang would reinterpret the bits where MSL "
                    f"converts each element; write {m.group(1)}(x) or static_cast<{m.group(1)}>(x)",
                )

    # --- threadgroup variables ------------------------------------------------------------------------
    def threadgroup_variables(self) -> None:
        depth = 0
        paren = 0
        define_lines = {m.start() for m in re.finditer(r"(?m)^[ \t]*#[ \t]*define\b", self.code)}
        define_ranges = []
        for start in define_lines:
            end = start
            while end < len(self.source) and self.source[end] != "\n":
                end = end + 2 if self.source.startswith("\\\n", end) else end + 1
            define_ranges.append((start, end))
        starts = {m.start() for m in re.finditer(r"\bthreadgroup\b", self.code)}
        for i, c in enumerate(self.code):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c == "(":
                paren += 1
            elif c == ")":
                paren -= 1
            elif i in starts and paren == 0:
                in_define = any(a <= i < b for a, b in define_ranges)
                if depth > 0 or in_define:
                    self.threadgroup_declaration(i)

    def threadgroup_declaration(self, start: int) -> None:
        before = self.code[:start].rstrip()
        if re.search(r"[\w(,<=&*]$", before) and not self._in_define(start):
            return  # e.g. `const threadgroup T* p`, a parameter or a cast: not a declaration of storage
        end = self.code.find(";", start)
        if end < 0:
            return
        statement = self.code[start:end].replace("\\\n", "  ")
        if re.search(r"[*&]", re.sub(r"\[[^\]]*\]", "", statement)):
            return  # a pointer or reference to threadgroup memory, held by the thread
        if "=" in statement:
            raise self.error(start, "threadgroup variables cannot have initialisers")
        declarators = split_top_level(statement[len("threadgroup") :])
        first = re.match(r"\s*(.*?)\s*\b([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)$", declarators[0], re.S)
        if not first or not first.group(1).strip():
            raise self.error(start, "cannot parse this threadgroup declaration")
        type_text = " ".join(first.group(1).split())
        parts = [(first.group(2), first.group(3))]
        for extra in declarators[1:]:
            m = re.match(r"\s*([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)$", extra, re.S)
            if not m:
                raise self.error(start, "cannot parse this threadgroup declaration")
            parts.append((m.group(1), m.group(2)))
        line, col = _line_col(self.source, start)
        out = []
        for k, (name, dims) in enumerate(parts):
            dims = " ".join(dims.split())
            site = zlib.crc32(f"{self.path}:{line}:{col}:{k}".encode()) & 0x7FFFFFFF
            out.append(
                f"threadgroup {type_text} (&{name}){dims} = "
                f"::mslsim::threadgroup_local<{type_text} {dims}, {site}u>()"
            )
        newlines = self.source.count("\n", start, end)
        continuation = " \\\n" if self._in_define(start) else "\n"
        self.threadgroup_ranges.append((start, end))
        self.edit(start, end, "; ".join(out) + continuation * newlines)

    def _in_define(self, pos: int) -> bool:
        line_start = self.source.rfind("\n", 0, pos) + 1
        while line_start > 0 and self.source[line_start - 2 : line_start] == "\\\n":
            line_start = self.source.rfind("\n", 0, line_start - 2) + 1
        return re.match(r"[ \t]*#[ \t]*define\b", self.source[line_start:]) is not None

    # --- attributes -----------------------------------------------------------------------------------
    def attributes(self) -> None:
        for m in re.finditer(r"\[\[\s*host_name\s*\(", self.code):
            close = self.matching(m.end() - 1, "(", ")")
            tail = re.match(r"\s*\]\]", self.code[close:])
            if not tail:
                raise self.error(m.start(), "cannot parse [[host_name(...)]]")
            argument = self.source[m.end() : close - 1]
            self.edit(m.start(), close + tail.end(), f"__mslsim_host_name({argument})")
        for m in re.finditer(r"\[\[\s*kernel\s*\]\]", self.code):
            self.edit(m.start(), m.end(), "__mslsim_kernel")
        for m in re.finditer(r"\[\[\s*threadgroup\s*\(", self.code):  # `threadgroup` is a macro
            self.edit(m.start(), m.end(), "[[__mslsim_threadgroup(")

    def result(self) -> str:
        inside = [
            e
            for e in self.edits
            if any(a <= e.start and e.end <= b and (e.start, e.end) != (a, b) for a, b in self.threadgroup_ranges)
        ]
        self.edits = [e for e in self.edits if e not in inside]
        self.edits.sort(key=lambda e: (e.start, e.end))
        out, pos = [], 0
        for e in self.edits:
            if e.start < pos:
                raise self.error(e.start, "overlapping rewrites (please report this construct)")
            out.append(self.source[pos : e.start])
            out.append(e.text)
            pos = e.end
        out.append(self.source[pos:])
        text = "".join(out)
        assert text.count("\n") == self.source.count("\n"), "the rewrite must keep the line count"
        escaped = self.path.replace("\\", "\\\\").replace('"', '\\"')
        return f'#line 1 "{escaped}"\n' + text


def matching_bracket(code: str, pos: int, opening: str, closing: str) -> int | None:
    """Index just past the bracket closing the one at ``code[pos]``; None if it is never closed."""
    depth = 0
    for k in range(pos, len(code)):
        if code[k] == opening:
            depth += 1
        elif code[k] == closing:
            depth -= 1
            if depth == 0:
                return k + 1
    return None


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([<{":
            depth += 1
        elif c in ")]>}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def rewrite(source: str, path: str) -> str:
    """The C++ that clang compiles for MSL ``source`` read from ``path`` (see the module docstring)."""
    r = _Rewriter(source, path)
    vector_names = r.vector_aliases()
    r.refuse_vector_casts(vector_names)
    r.literals()
    r.threadgroup_variables()
    r.conversions(vector_names)
    r.attributes()
    return r.result()

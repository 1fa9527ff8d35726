"""Exceptions raised by the MSL simulator."""


class MslError(Exception):
    """Base class of every simulator error."""


class MslCompileError(MslError):
    """The shader was refused: by clang, by the source rewriter, or by the kernel-signature parser."""


class MslRuntimeError(MslError):
    """A launch failed: fault, race between schedules, divergent barrier or collective, deadlock, limits."""

"""Checkpoint I/O: our quantized checkpoint format and GGUF import."""

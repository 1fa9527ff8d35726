"""Models: loading (our checkpoints, GGUF, transformers integration); the runtime comes later."""

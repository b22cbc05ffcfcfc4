"""savepoint: Llama 3 training with TorchTitan-style, crash-safe DCP checkpoints."""

__version__ = "0.1.0"

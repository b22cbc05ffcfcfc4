"""Hugging Face formats: safetensors folders in and out (folder, files, assets), the Llama 3 key map and adapter.

Nothing here imports ``savepoint.checkpoint`` or the converters (``savepoint.convert``).
"""

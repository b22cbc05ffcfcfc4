"""Hugging Face interop: the Llama 3 key map and RoPE permutation, safetensors folders in and out."""

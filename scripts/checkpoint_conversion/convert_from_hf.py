"""Convert a Hugging Face Llama 3 folder into a model-only DCP checkpoint (TorchTitan's script, same arguments).

    python scripts/checkpoint_conversion/convert_from_hf.py INPUT_DIR OUTPUT_DIR \\
        --model_name llama3 --model_flavor 8B [--dtype float32|bfloat16|float16|keep]

The output (``.metadata`` + ``__0_0.distcp``, float32 by default) is what
``--checkpoint.initial_load_path`` loads, or put it at ``<checkpoint folder>/step-0``. Runs from any
directory; see ``savepoint/convert/``.
"""

import sys
from pathlib import Path

try:
    from savepoint.convert.cli import main
except ModuleNotFoundError as e:  # run with a Python that lacks savepoint (or torch)
    sys.exit(f"error: {e.name} is not installed for {sys.executable}; use the repository's .venv/bin/python "
             "(./run_train.sh creates it) or `pip install -e .` in the repository first")

if __name__ == "__main__":
    sys.exit(main(["from_hf", *sys.argv[1:]], prog=Path(__file__).name))

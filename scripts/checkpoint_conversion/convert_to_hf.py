"""Convert a DCP checkpoint step folder into a Hugging Face Llama 3 folder (TorchTitan's script, same arguments).

    python scripts/checkpoint_conversion/convert_to_hf.py INPUT_DIR OUTPUT_DIR \\
        --hf_assets_path ./assets/hf/Llama-3.1-8B --model_name llama3 --model_flavor 8B \\
        [--export_dtype float32|bfloat16|float16] [--max_shard_size 5GB]

INPUT_DIR is a ``step-N`` folder, full training or model-only, saved at any world size. Without
``--model_flavor`` the flavor the step's ``manifest.json`` records is used (8B for a step without
one); a given flavor must match the recorded one. The output holds the weights,
``model.safetensors.index.json``, ``config.json`` and the tokenizer files of ``--hf_assets_path``
(regular files only; without it, a warning: the export has no tokenizer). Runs from any directory;
see ``savepoint/convert/``.
"""

import sys
from pathlib import Path

try:
    from savepoint.convert.cli import main
except ModuleNotFoundError as e:  # run with a Python that lacks savepoint (or torch)
    sys.exit(f"error: {e.name} is not installed for {sys.executable}; use the repository's .venv/bin/python "
             "(./run_train.sh creates it) or `pip install -e .` in the repository first")

if __name__ == "__main__":
    sys.exit(main(["to_hf", *sys.argv[1:]], prog=Path(__file__).name))

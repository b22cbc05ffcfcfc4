"""The path the TorchTitan guide's conversion example uses: the same as
``scripts/checkpoint_conversion/convert_from_hf.py`` (Hugging Face Llama 3 folder -> DCP checkpoint).

    python scripts/convert_from_hf.py INPUT_DIR OUTPUT_DIR --model_name llama3 --model_flavor 8B
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent / "checkpoint_conversion" / "convert_from_hf.py"),
                   run_name="__main__")

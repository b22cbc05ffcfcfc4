"""Train the small byte-level BPE tokenizer the tests ship, from savepoint's own corpus.

    python -m scripts.make_tokenizer [OUT_DIR]   # default: tests/assets/tokenizer

Writes ``tokenizer.json`` and ``tokenizer_config.json`` (a Hugging Face tokenizer folder that
``--model.hf_assets_path`` and transformers' ``AutoTokenizer`` both read): 2000 tokens, of which
``<|begin_of_text|>`` (id 0) and ``<|end_of_text|>`` (id 1) are special. The same corpus gives
the same files, byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "savepoint" / "data" / "assets" / "pydocs.txt"
VOCAB_SIZE = 2000
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
DOC_SEPARATOR = "\n\n\n"


def train_tokenizer():
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the merges never depend on scheduling
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [d.strip() for d in CORPUS.read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def tokenizer_config(tokenizer) -> dict:
    special = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for t in (BOS, EOS)}
    return {"added_tokens_decoder": special, "bos_token": BOS, "eos_token": EOS, "clean_up_tokenization_spaces": False,
            "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "tests" / "assets" / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2) + "\n")
    print(f"wrote {out}/tokenizer.json ({tokenizer.get_vocab_size()} tokens) and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

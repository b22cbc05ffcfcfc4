"""Tokenizers: the built-in byte tokenizer, and a Hugging Face ``tokenizer.json`` folder.

The byte tokenizer (ids 0-255 are the UTF-8 bytes, then BOS and EOS) needs no vocabulary file, so
nothing is downloaded, and it round-trips any text exactly. ``HFTokenizer`` reads a folder the
way TorchTitan's ``--model.hf_assets_path`` does: ``tokenizer.json`` through the ``tokenizers``
library, and BOS/EOS named by ``tokenizer_config.json`` (``bos_token`` / ``eos_token``, a string
or ``{"content": ...}``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from savepoint.errors import SavepointError
from savepoint.safe_io import read_regular

logger = logging.getLogger(__name__)

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258
TOKENIZER_LIMIT = 512 * 1024**2  # a tokenizer.json is at most a few tens of MB
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    vocab_size: int  # every id the tokenizer emits is below this

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _snapshot_blob(folder: Path, path: Path) -> Path | None:
    """The blob a Hugging Face cache snapshot's link stands for (``snapshots/<rev>/x -> ../../blobs/<hash>``)."""
    snapshot = folder.resolve()
    if not path.is_symlink() or snapshot.parent.name != "snapshots":
        return None
    target = path.resolve()
    ok = target.parent == snapshot.parent.parent / "blobs" and target.is_file() and not target.is_symlink()
    return target if ok else None


def _read_text(folder: Path, name: str, flag: str) -> str | None:
    """The text of ``folder/name`` (None when absent): a regular file, or a HF cache snapshot's blob."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        data = read_regular(_snapshot_blob(folder, path) or path, TOKENIZER_LIMIT, "tokenizer file", SavepointError)
        return data.decode("utf-8")
    except SavepointError as e:
        raise SavepointError(f"{flag}: {e}; put the real file there (`cp -L`)") from None
    except UnicodeDecodeError:
        raise SavepointError(f"{flag}: {path} is not UTF-8 text; replace it with the model's {name}") from None


def _token_text(config: dict[str, Any], key: str, where: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise SavepointError(f"{where}: {key} is {config.get(key)!r}; it must be a token string or "
                             "{\"content\": <string>}. Fix the file")
    return value


class HFTokenizer:
    """A Hugging Face tokenizer folder: ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS).

    ``encode(text)`` gives BOS + text + EOS like the byte tokenizer; a BOS or EOS the
    tokenizer's own post-processor already adds (Llama 3's adds BOS) is not added twice.

    Raises:
        SavepointError: the folder has no ``tokenizer.json``, a file is not a regular file or not
            valid, or no EOS token is named (documents are joined with it).
    """

    def __init__(self, folder: str | Path, flag: str = "--model.hf_assets_path"):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        self.folder = Path(folder)
        text = _read_text(self.folder, "tokenizer.json", flag)
        if text is None:
            raise SavepointError(f"{flag}={folder} holds no tokenizer.json; point it at a Hugging Face model folder "
                                 "that has one, or unset it to train with the byte tokenizer")
        try:
            self.tokenizer = RustTokenizer.from_str(text)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SavepointError(f"{flag}: {self.folder / 'tokenizer.json'} is not a tokenizer the `tokenizers` "
                                 f"library reads ({first}); replace it with the model's tokenizer.json") from None
        config_text = _read_text(self.folder, "tokenizer_config.json", flag)
        where = f"{flag}: {self.folder / 'tokenizer_config.json'}"
        try:
            config = json.loads(config_text) if config_text is not None else {}
        except json.JSONDecodeError as e:
            raise SavepointError(f"{where} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            raise SavepointError(f"{where} is not a JSON object; fix or remove it")
        specials = [t for t in (_token_text(config, k, where) for k in SPECIAL_KEYS) if t is not None]
        if specials:  # the tokens tokenizer_config.json names are special, as transformers treats them
            self.tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.bos_token = _token_text(config, "bos_token", where)
        self.eos_token = _token_text(config, "eos_token", where)
        self.bos_id = None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)
        eos_id = None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise SavepointError(f"{flag}={folder}: tokenizer_config.json names no eos_token in the vocabulary; "
                                 "training joins documents with it. Add \"eos_token\" to tokenizer_config.json")
        self.eos_id: int = eos_id
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        empty = self.tokenizer.encode("").ids
        self._adds_bos = self.bos_id is not None and self.bos_id in empty
        self._adds_eos = self.eos_id in empty

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        return self._with_specials(self.tokenizer.encode(text, add_special_tokens=True).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        return [self._with_specials(e.ids, bos, eos) for e in self.tokenizer.encode_batch(texts)]

    def _with_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """``ids`` with exactly one BOS (if ``bos``) and EOS (if ``eos``), wherever the post-processor put its own."""
        if self._adds_bos and not bos and ids[:1] == [self.bos_id]:
            ids = ids[1:]
        if self._adds_eos and not eos and ids[-1:] == [self.eos_id]:
            ids = ids[:-1]
        if bos and not self._adds_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and not self._adds_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def build_tokenizer(folder: str | Path | None, flag: str = "--model.hf_assets_path") -> Tokenizer:
    """The tokenizer of an HF folder; the byte tokenizer without one, or when the folder has no ``tokenizer.json``.

    A folder without ``tokenizer.json`` (one holding only weights, which ``--model.hf_assets_path``
    also names) trains with the byte tokenizer, saying so.

    Raises:
        SavepointError: ``folder`` is not a folder, or see ``HFTokenizer``.
    """
    if folder is None:
        return ByteTokenizer()
    path = Path(folder)
    if not path.is_dir():
        raise SavepointError(f"{flag}={folder} is not a folder; point it at the Hugging Face model folder holding "
                             "tokenizer.json, or leave it unset for the byte tokenizer")
    if not os.path.lexists(path / "tokenizer.json"):
        logger.warning("%s=%s holds no tokenizer.json: training uses the byte tokenizer (ids 0-%d); put the model's "
                       "tokenizer.json and tokenizer_config.json there to train with its tokenizer",
                       flag, folder, VOCAB_SIZE - 1)
        return ByteTokenizer()
    return HFTokenizer(path, flag)

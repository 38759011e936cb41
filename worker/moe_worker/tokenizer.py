"""Text <-> token ids for the server's BYTES `text` input and output.

- `HFTokenizer`: the checkpoint's own `tokenizer.json` (Hugging Face `tokenizers`), when the
  checkpoint directory ships one. `encode` adds the tokenizer's special tokens (DeepSeek-V3's adds
  its BOS), as `AutoTokenizer(text)` does; `decode` skips special tokens.
- `ByteTokenizer`: the fallback for checkpoints without one (random test checkpoints): one token
  per UTF-8 byte, id = byte value (0..255), no special tokens. Decoding turns runs of byte ids back
  into UTF-8 (invalid sequences become U+FFFD) and every id >= 256, which no byte maps to, into
  U+FFFD as well. It needs a vocabulary of at least 256 ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """Text that cannot be encoded for this model, or a tokenizer that cannot be loaded."""


class Tokenizer(Protocol):
    name: str
    """What the server reports: 'tokenizer.json' or 'bytes'."""

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; `special`: add the tokenizer's special tokens (BOS) as it is set up to."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (see the module docstring)."""

    name = "bytes"

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise TokenizerError(f"the byte-level tokenizer needs a vocabulary of >= 256 ids, this model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
            parts.append(REPLACEMENT)
        if run:
            parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (needs the `tokenizers` package)."""

    name = TOKENIZER_FILE

    def __init__(self, path: str | Path, vocab_size: int):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise TokenizerError(f"{path}: reading tokenizer.json needs the 'tokenizers' package") from None
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass for bad files
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise TokenizerError(f"{path}: tokenizer has {size} ids, the model's vocabulary only {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(checkpoint_dir: str | Path | None, vocab_size: int) -> Tokenizer | None:
    """The checkpoint's tokenizer.json if it has one, else the byte fallback; None when neither
    fits (vocabulary below 256 and no tokenizer.json): the server then takes token ids only."""
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / TOKENIZER_FILE
        if path.is_file():
            return HFTokenizer(path, vocab_size)
    if vocab_size >= 256:
        return ByteTokenizer(vocab_size)
    return None

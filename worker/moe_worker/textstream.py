"""Generated token ids -> text pieces for streaming: never half a character, stop strings honoured.

`TextStream` takes a sequence's output ids one at a time and gives the text each adds, such that
the pieces joined are exactly `tokenizer.decode(all ids)` (cut at the first stop string, if any):
- a piece never ends in U+FFFD that a later token might still complete: text whose decode ends in
  the replacement character is held back until more ids arrive or the sequence ends (byte-level
  vocabularies emit a multi-byte character over several tokens; random checkpoints emit bytes
  that never form valid UTF-8, and at the end those go out as U+FFFD, as the non-streamed text has
  them);
- the text is decoded from a window that starts a few tokens before the first id not yet fully
  sent, so the cost per token stays bounded;
- a stop string ends the text before it (it is not emitted); while streaming, as many characters
  as the longest stop string has, less one, are held back, so a stop string's first part never
  goes out before it is known whether the rest follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import REPLACEMENT, Tokenizer

_CONTEXT = 4  # ids decoded before the first unsent one, so that merges across the boundary decode as in the whole


@dataclass
class Piece:
    text: str
    """New text (may be empty while characters or a possible stop string are held back)."""
    stopped: bool = False
    """A stop string was found: the text ends before it and the sequence should end."""


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        """All text decoded so far (complete characters only, stop strings not cut)."""
        self.sent = 0
        """Characters of `text` already emitted."""
        self.stopped = False
        self._base = 0  # ids before this index are fully in `text[:self._base_chars]`
        self._base_chars = 0

    def add(self, token: int) -> Piece:
        """The text `token` adds that can go out now."""
        if self.stopped:
            return Piece("", True)
        self.ids.append(token)
        self._decode(final=False)
        return self._emit(final=False)

    def finish(self) -> Piece:
        """The sequence ended: everything held back that belongs to the answer."""
        if self.stopped:
            return Piece("", True)
        self._decode(final=True)
        return self._emit(final=True)

    def full_text(self) -> str:
        """The whole answer's text (what the pieces join to once finished)."""
        return self.text[:self.sent] if self.stopped else self.text

    # ---- steps ----

    def _decode(self, final: bool) -> None:
        """Bring `text` up to date with `ids`, keeping a trailing U+FFFD out unless `final`."""
        start = max(self._base - _CONTEXT, 0)
        head = self.tok.decode(self.ids[start:self._base]) if start < self._base else ""
        window = self.tok.decode(self.ids[start:])
        if not window.startswith(head) or self._base_chars < len(head):
            # The window's decode of the already-settled ids differs (a tokenizer whose decode
            # depends on what precedes): decode everything, as the non-streamed text would.
            whole = self.tok.decode(self.ids)
            self._settle(whole, final, len(self.ids))
            return
        new = window[len(head):]
        whole = self.text[:self._base_chars] + new
        self._settle(whole, final, len(self.ids))

    def _settle(self, whole: str, final: bool, n_ids: int) -> None:
        if not final and whole.endswith(REPLACEMENT):
            return  # an unfinished character: wait for the next id
        self.text = whole
        self._base, self._base_chars = n_ids, len(whole)

    def _emit(self, final: bool) -> Piece:
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                piece = self.text[self.sent:cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                self.stopped = True
                return Piece(piece, True)
        hold = 0 if final or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(len(self.text) - hold, self.sent)
        piece = self.text[self.sent:end]
        self.sent = end
        return Piece(piece)

    def _find_stop(self) -> int | None:
        """Where the first stop string starts in `text`, looking only where a new one can be."""
        longest = max(len(s) for s in self.stop)
        lo = max(self.sent - longest + 1, 0)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

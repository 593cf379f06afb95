"""Stop sequences: cut a choice's text before the first stop string, and stream only text that is safe."""

from __future__ import annotations


class StopText:
    """The text of one choice so far, cut at the first stop string once one appears.

    While stop strings are set, the last ``len(longest stop) - 1`` characters are held back from
    streaming: they might be the start of a stop string that the next token completes, and text
    already sent cannot be taken back.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of ``text`` handed out by append/flush
        self.stopped = False

    def append(self, piece: str) -> str:
        """Add newly decoded text; return the part of the text that may be streamed now."""
        if self.stopped or not piece:
            return ""
        prev = len(self.text)
        self.text += piece
        if self.stops:
            # A match must end in the new piece (earlier text was checked already).
            lo = max(0, prev - self._hold)
            found = [i for s in self.stops if (i := self.text.find(s, lo)) >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._hold
        if safe <= self.sent:
            return ""
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def flush(self) -> str:
        """Everything not yet handed out (the held-back tail, at the end of the choice)."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

"""Token ids to text, one token at a time, with stop strings.

`TextStream.push(token)` returns the text that is now safe to show:
- bytes of a UTF-8 character split across tokens are held until the character is complete (an
  incremental UTF-8 decoder over each token's bytes), so half a character is never emitted; bytes
  that can never form a character become U+FFFD, as `Tokenizer.decode` would;
- while the text's tail could still be the start of a stop string, it is held back; when a stop
  string appears, the text before it is released, the stop string and everything after it is
  dropped, and the stream reports it stopped.

It runs where the text is consumed (the HTTP handler, `generate`), never in the engine loop, so
detokenising never stalls the batch.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from llama3hp.data.tokenizer import Tokenizer


class TextStream:
    """Incremental detokenisation of one sequence, with up to four stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text held back: it may begin a stop string
        self.text = ""  # everything released so far
        self.stopped = False
        self.n_tokens = 0  # tokens pushed (completion tokens, up to the stop)

    def push(self, token: int) -> str:
        """Feed one generated token; returns the newly released text ("" while held back)."""
        if self.stopped:
            return ""
        self.n_tokens += 1
        self._pending += self._utf8.decode(self._token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """The end of generation: release what was held back (a partial stop match is text)."""
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _token_bytes(self, token: int) -> bytes:
        return self.tokenizer.model.decode_single_token_bytes(token)

    def _release(self, final: bool) -> str:
        buf = self._pending
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._pending, self.stopped = buf[: min(hits)], "", True
        elif final:
            out, self._pending = buf, ""
        else:
            hold = self._partial_match(buf)
            out, self._pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _partial_match(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

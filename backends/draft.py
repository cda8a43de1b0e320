"""What a decode expects to say: the text tokens of a decode of the same audio a moment ago.

A live stream decodes its buffer again every second or so, and each decode says the words of the
one before (the committed ones, then those waiting for a second hypothesis) before the new ones.
Those tokens are a draft: the engine checks many of them in one decoder pass
(`DecoderStep.verify`), takes those a greedy step would have taken, and steps one token at a time
only where the decode departs from the draft. The words are the greedy decode's own; only the
number of decoder passes changes.
"""
from __future__ import annotations

from dataclasses import dataclass

# After a token that is not the draft's next, the draft's next few are searched for it: the decode
# dropped a word of the draft (or changed one: its next token is the draft's after the changed one).
RESYNC_TOKENS = 6
# A decode that has departed from its draft this many tokens in a row says something else: steps on.
MAX_MISSES = 3


@dataclass
class Draft:
    """A row's draft and how far its decode has followed it."""

    tokens: list[int]
    at: int = 0  # the next drafted token
    misses: int = 0  # text tokens since the decode last said a drafted one

    def follow(self, token: int) -> None:
        """The decode took text token `token`."""
        nxt = self.tokens[self.at:self.at + RESYNC_TOKENS]
        if token in nxt:
            self.at += nxt.index(token) + 1
            self.misses = 0
        else:
            self.misses += 1
            if self.misses >= MAX_MISSES:
                self.at = len(self.tokens)

    def ahead(self, limit: int) -> list[int]:
        """The next drafted tokens to check, while the decode is following the draft."""
        return [] if self.misses else self.tokens[self.at:self.at + limit]

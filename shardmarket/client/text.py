"""Incremental detokenization: turns a stream of token ids into text deltas."""

from __future__ import annotations


class TextStream:
    """Feed token ids, get the new text; holds back an incomplete UTF-8 character until it completes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now final (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def finish(self) -> str:
        """Whatever is still held back once no token follows."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent :], len(text)
        return delta

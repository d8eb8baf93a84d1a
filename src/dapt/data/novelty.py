"""Lexical novelty, for launch/anomaly.py's embed.score=lexical and fused: the share of a document's character n-grams
never seen in the normal training documents. It catches what an embedding averages away (a quote, a comment
marker or an encoded byte where none ever appeared) and explains itself: the novel spans are the finding.

With `digits`, every digit is read as 0 first, so new numbers (prices, ids, card numbers) are not novel but a digit
where letters always were still is.
"""

from __future__ import annotations

import re

import numpy as np

from dapt.data.packing import wrappers

_DIGIT = re.compile(r"[0-9]")


class CharNovelty:
    def __init__(self, n: int = 3, digits: bool = True):
        self.n, self.digits = n, digits
        self.seen: set[str] = set()

    def _text(self, text: str) -> str:
        return _DIGIT.sub("0", text) if self.digits else text

    def _grams(self, text: str) -> list[str]:
        t = self._text(text)
        return [t[i : i + self.n] for i in range(len(t) - self.n + 1)]

    def fit(self, texts) -> CharNovelty:
        for text in texts:
            self.seen.update(self._grams(text))
        return self

    def score(self, texts) -> np.ndarray:
        out = []
        for text in texts:
            grams = self._grams(text)
            out.append(sum(g not in self.seen for g in grams) / max(1, len(grams)))
        return np.asarray(out, dtype=np.float64)

    def novel_chars(self, text: str) -> np.ndarray:
        """Per character of the text: does it lie in a novel n-gram?"""
        out = np.zeros(len(text), dtype=bool)
        for i, g in enumerate(self._grams(text)):
            if g not in self.seen:
                out[i : i + self.n] = True
        return out

    def novel_tokens(self, tokenizer, texts: list[str], max_len: int) -> list[np.ndarray] | None:
        """Per token of each text's row as packing's "pad" builds it (the sequence markers around the tokens that fit
        max_len): does the token touch a novel n-gram (a space that byte-level BPE counts into its span aside)? None
        for a tokenizer without offsets (not a fast one)."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        if not texts:
            return []
        head, tail = wrappers(tokenizer)
        body = max_len - len(head) - len(tail)
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_offsets_mapping=True,
            verbose=False,
        )
        out = []
        for text, offsets in zip(texts, enc["offset_mapping"]):
            chars = self.novel_chars(text)
            inner = []
            for start, end in offsets[:body]:
                while start < end and text[start].isspace():
                    start += 1
                inner.append(bool(chars[start:end].any()))
            out.append(np.array([False] * len(head) + inner + [False] * len(tail), dtype=bool))
        return out

    def spans(self, text: str, most: int) -> list[str]:
        """The text's novel spans (overlapping novel n-grams merged), longest first, at most `most`."""
        grams = self._grams(text)
        found, start, end = [], None, -1
        for i, g in enumerate(grams):
            if g in self.seen:
                continue
            if start is not None and i <= end:
                end = i + self.n
            else:
                if start is not None:
                    found.append(text[start:end])
                start, end = i, i + self.n
        if start is not None:
            found.append(text[start:end])
        return sorted(found, key=len, reverse=True)[:most]

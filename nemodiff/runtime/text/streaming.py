"""Text deltas for streaming, from the request's incremental detokenizer.

checkpoint ──builder──▶ engine dir ──[runtime: streaming]──▶ Triton

Each update costs O(new tokens): the request's detokenizer decodes only a short window.
Anything that could still grow into a stop string is held back until it is settled, and the
last delta is taken from the final text, so the deltas always concatenate to the final text.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, request):  # a runtime.request.Request (text sits below it in the ladder)
        self.request = request
        self.sent_len = 0
        self.sent_tail = ""  # the last characters sent, to check the text still extends them
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1

    def delta(self) -> str:
        text = self.request.text
        if not self.request.finished and self.holdback:
            text = text[: max(len(text) - self.holdback, 0)]
        tail = self.sent_tail
        if len(text) <= self.sent_len or not text.startswith(tail, self.sent_len - len(tail)):
            return ""  # nothing new, or earlier text is still settling (only possible mid-sequence)
        out = text[self.sent_len:]
        self.sent_len = len(text)
        self.sent_tail = (tail + out)[-64:]
        return out

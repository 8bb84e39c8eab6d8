"""Text deltas for streaming, decoded from the accumulated output ids.

checkpoint ──builder──▶ engine dir ──[runtime: streaming]──▶ Triton

Decoding token by token breaks spaces and multi-byte characters, so each delta is the
new suffix of the decoded text of all tokens so far. A trailing replacement character
(an incomplete UTF-8 sequence) and anything that could still grow into a stop string are
held back until they are settled, so the deltas always concatenate to the final text.
"""

from __future__ import annotations

from .request import Request


class TextStream:
    def __init__(self, request: Request):
        self.request = request
        self.sent = ""
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1

    def delta(self) -> str:
        text = self.request.text
        if not self.request.finished:
            if self.holdback:
                text = text[: max(len(text) - self.holdback, 0)]
            while text.endswith("\ufffd"):
                text = text[:-1]
        if not text.startswith(self.sent):
            return ""  # earlier text is still settling (only possible mid-sequence); wait for it
        out = text[len(self.sent):]
        self.sent += out
        return out

"""KV events for Dynamo's router: which prefix-cache pages this worker holds, in Dynamo's block size.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: prefix-cache events ▶ Dynamo's KV router]

The engine's prefix index (nemodiff/runtime/model/prefix_cache.py) tells its listener about every
full page of committed tokens it indexes, evicts, forgets or clears. Those changes are queued from the
engine's loop thread (no waiting there) and published from a thread of this module through Dynamo's
`KvEventPublisher`: a page is a block of `kv_page_size` tokens (16 by default), named by a 64-bit
hash of its prefix digest, its parent the page before.

Two frames. The router hashes the token ids the frontend made; the worker adds BOS to a completion
prompt that lacks it (requests.py), so such a prompt's pages hold the router's tokens shifted by one.
Each page of a sequence that starts with BOS is therefore announced twice: as itself (what a chat
prompt, whose template wrote BOS, looks like to the router) and as the block of the 16 tokens that
follow BOS there (what the same text sent as a completion looks like), each removed with its page.
Besides, a snapshot of the load (pages in use, the hit rate) goes to the router about ten times a second.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

SHIFTED = b"\x01"  # the second frame's salt


def block_hash(digest: bytes, shifted: bool = False) -> int:
    """A page's name for Dynamo: a signed 64-bit integer from its prefix digest (and the frame)."""
    raw = hashlib.blake2b(digest + SHIFTED, digest_size=8).digest() if shifted else digest[:8]
    return int.from_bytes(raw, "little", signed=True)


class KvEventRelay:
    """Prefix-index changes in, `publish_stored` / `publish_removed` out, on a thread of its own.

    page_size: tokens per page; bos: the id the worker adds before a completion prompt (None: no
    shifted frame); snapshot(): the load for the router (None when not wanted)."""

    def __init__(self, page_size: int, bos: int | None, snapshot: Callable[[], object] | None = None):
        self.page_size = page_size
        self.bos = bos
        self.snapshot = snapshot
        self.snapshot_publisher = None  # set when Dynamo hands one over
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._published: dict[bytes, list[int]] = {}  # digest -> the hashes announced for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stored = self.removed = 0  # blocks announced, for tests and logs

    def listen(self, event: tuple) -> None:
        """The prefix index's listener: called on the engine's loop thread, never blocks."""
        self._events.put(event)

    def attach(self, publisher) -> None:
        """Dynamo's PushSource callback: start publishing through `publisher`."""
        self._thread = threading.Thread(target=self._run, args=(publisher,), name="nemodiff-kv-events", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, publisher) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                self._publish_snapshot()
                continue
            try:
                self.publish(publisher, event)
            except Exception:  # one bad event must not stop the stream
                log.exception("publishing a KV event failed")

    def publish(self, publisher, event: tuple) -> None:
        kind = event[0]
        if kind == "stored":
            _, digest, parent, page, first, tokens = event
            size = self.page_size
            hashes = [block_hash(digest)]
            publisher.publish_stored(token_ids=[int(t) for t in tokens[-size:]], num_block_tokens=[size],
                                     block_hashes=list(hashes), parent_hash=block_hash(parent) if parent else None)
            if self.bos is not None and first == self.bos and page >= 1 and len(tokens) == 2 * size:
                shifted = block_hash(digest, shifted=True)
                publisher.publish_stored(token_ids=[int(t) for t in tokens[1: size + 1]], num_block_tokens=[size],
                                         block_hashes=[shifted],
                                         parent_hash=block_hash(parent, shifted=True) if page >= 2 else None)
                hashes.append(shifted)
            self._published[digest] = hashes
            self.stored += len(hashes)
        elif kind == "removed":
            gone = [h for digest in event[1] for h in self._published.pop(digest, [])]
            if gone:
                publisher.publish_removed(block_hashes=gone)
                self.removed += len(gone)
        elif kind == "cleared":
            gone = [h for hashes in self._published.values() for h in hashes]
            self._published.clear()
            if gone:
                publisher.publish_removed(block_hashes=gone)
                self.removed += len(gone)

    def _publish_snapshot(self) -> None:
        if self.snapshot_publisher is None or self.snapshot is None:
            return
        try:
            self.snapshot_publisher.publish(0, self.snapshot())
        except Exception:
            log.exception("publishing the load snapshot failed")

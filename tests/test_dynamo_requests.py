"""The Dynamo worker's pieces that need no Dynamo: request translation, and the KV events of the prefix index.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: Dynamo request dicts, prefix-cache events]
"""

from __future__ import annotations

import pytest
import torch

from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.prefix_cache import page_digests
from nemodiff.serving.dynamo.kv_events import KvEventRelay, block_hash
from nemodiff.serving.dynamo.requests import RequestError, final_fields, prompt_ids, sampling_params

BOS = 1


def params(**request):
    return sampling_params(request, "ar", max_seq_len=256, prompt_len=10, eos_ids=[2])


def test_the_annotation_picks_the_mode_and_fields_map_onto_sampling_params():
    got = params(annotations=["formatted_prompt", "decode_mode:linear_spec"],
                 stop_conditions={"max_tokens": 7, "min_tokens": 2, "ignore_eos": True, "stop_token_ids_hidden": [2, 9]},
                 sampling_options={"temperature": 0.5, "top_k": -1, "top_p": 0.9, "seed": 3},
                 output_options={"logprobs": 2})
    assert (got.mode, got.max_new_tokens, got.min_tokens, got.ignore_eos) == ("linear-spec", 7, 2, True)
    assert (got.temperature, got.top_k, got.top_p, got.seed, got.logprobs) == (0.5, 0, 0.9, 3, 2)
    assert got.stop_token_ids == [9]  # the hidden EOS is the engine's own stop
    defaults = params()
    assert (defaults.mode, defaults.max_new_tokens, defaults.temperature) == ("ar", 246, 0.0)  # the rest of the context
    assert params(sampling_options={"guided_decoding": {"choice": ["yes", "no"]}}).guide.choices == ("yes", "no")


@pytest.mark.parametrize("request_fields, named", [
    ({"sampling_options": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"sampling_options": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"sampling_options": {"n": 2}}, "n=2"),
    ({"output_options": {"prompt_logprobs": 1}}, "prompt_logprobs"),
    ({"annotations": ["decode_mode:beam"]}, "decode_mode:beam"),
    ({"stop_conditions": {"max_tokens": 4, "min_tokens": 9}}, "min_tokens"),
])
def test_what_the_engine_cannot_serve_is_refused_by_name(request_fields, named):
    with pytest.raises(RequestError, match=named):
        params(**request_fields)


def test_a_prompt_without_bos_gets_it_and_usage_counts_cached_tokens():
    assert prompt_ids([5, 6], [BOS]) == [BOS, 5, 6] and prompt_ids([BOS, 5], [BOS]) == [BOS, 5]
    assert prompt_ids([5], []) == [5]

    class Update:
        finish_reason, output = "eos", type("Out", (), {"output_ids": [3, 2], "cached_prompt_tokens": 16})()

    assert final_fields(Update(), 20) == {"finish_reason": "stop", "completion_usage": {
        "prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22, "prompt_tokens_details": {"cached_tokens": 16}}}


class Recorder:
    """Stands where Dynamo's KvEventPublisher stands (which needs a running Dynamo runtime)."""

    def __init__(self):
        self.calls = []

    def publish_stored(self, **kw):
        self.calls.append(("stored", kw["block_hashes"], kw["token_ids"], kw["parent_hash"]))

    def publish_removed(self, block_hashes):
        self.calls.append(("removed", sorted(block_hashes)))


def test_prefix_index_changes_become_dynamo_blocks_in_both_frames():
    page = 4
    cache = PagedKVCache(1, 1, 4, page, 4, torch.float32, prefix_cache=True)
    events = []
    cache.prefix.listener = events.append
    tokens = [BOS, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    digests = page_digests(tokens, page, 2)
    cache.add_request(0)
    cache.append(0, len(tokens))
    cache.offer_pages(0, digests, tokens)
    assert [e[:4] for e in events] == [("stored", digests[0], None, 0), ("stored", digests[1], digests[0], 1)]
    relay, publisher = KvEventRelay(page, bos=BOS), Recorder()
    for event in events:
        relay.publish(publisher, event)
    a0, a1, b1 = block_hash(digests[0]), block_hash(digests[1]), block_hash(digests[1], shifted=True)
    assert publisher.calls == [("stored", [a0], tokens[:4], None), ("stored", [a1], tokens[4:8], a0),
                               ("stored", [b1], tokens[1:5], None)]  # what the router sees without BOS
    cache.truncate(0, 5)  # page 1 is rewritten: it leaves the index
    cache.free(0)
    cache.add_request(1)
    cache.append(1, 16)  # needs every page: the idle indexed page 0 is evicted
    assert events[2:] == [("removed", [digests[1]]), ("removed", [digests[0]])]
    for event in events[2:]:
        relay.publish(publisher, event)
    assert publisher.calls[3:] == [("removed", sorted([a1, b1])), ("removed", [a0])]
    relay.publish(publisher, ("cleared",))
    assert len(publisher.calls) == 5  # nothing left to remove

"""Paged KV cache bookkeeping."""

import pytest
import torch

from nemodiff.runtime.model.kv_cache import KVCacheFullError, PagedKVCache


def make_cache(num_pages=6, page_size=4):
    return PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, page_size=page_size, num_pages=num_pages,
                        dtype=torch.float32)


def test_append_across_page_boundaries_allocates_pages():
    cache = make_cache()
    cache.add_request(7)
    slots = cache.append(7, 3)
    assert cache.length(7) == 3 and len(cache.page_table(7)) == 1
    slots2 = cache.append(7, 6)  # crosses into the second and third page
    assert cache.length(7) == 9 and len(cache.page_table(7)) == 3
    table = cache.page_table(7)
    expected = [table[p // 4] * 4 + p % 4 for p in range(3, 9)]
    assert slots2.tolist() == expected and slots.tolist() == [table[0] * 4 + i for i in range(3)]
    assert cache.num_used_pages == 3 and cache.num_free_pages == 3


def test_truncate_frees_pages_and_keeps_prefix_slots():
    cache = make_cache()
    cache.add_request(1)
    cache.append(1, 10)
    before = cache.slots(1, torch.arange(5)).tolist()
    cache.truncate(1, 5)
    assert cache.length(1) == 5 and len(cache.page_table(1)) == 2 and cache.num_free_pages == 4
    assert cache.slots(1, torch.arange(5)).tolist() == before
    with pytest.raises(ValueError):
        cache.truncate(1, 6)  # cannot grow by truncating
    cache.truncate(1, 0)
    assert cache.page_table(1) == [] and cache.num_free_pages == 6


def test_free_returns_every_page_and_exhaustion_raises_clear_error():
    cache = make_cache(num_pages=3)
    cache.add_request(1)
    cache.append(1, 8)
    cache.add_request(2)
    with pytest.raises(KVCacheFullError, match="KV cache full: request 2 needs 2 more page"):
        cache.append(2, 5)
    assert cache.page_table(2) == [] and cache.length(2) == 0  # nothing half-allocated
    cache.free(1)
    assert cache.num_free_pages == 3
    cache.append(2, 12)
    assert cache.num_free_pages == 0


def test_no_page_is_shared_by_two_live_requests():
    cache = make_cache(num_pages=12, page_size=2)
    gen = torch.Generator().manual_seed(0)
    live = {}
    for _ in range(200):
        rid = int(torch.randint(0, 5, (1,), generator=gen))
        action = int(torch.randint(0, 3, (1,), generator=gen))
        if rid not in live:
            cache.add_request(rid)
            live[rid] = True
        try:
            if action == 0:
                cache.append(rid, int(torch.randint(1, 5, (1,), generator=gen)))
            elif action == 1:
                cache.truncate(rid, cache.length(rid) // 2)
            else:
                cache.free(rid)
                del live[rid]
        except KVCacheFullError:
            pass
        pages = [p for r in live for p in cache.page_table(r)]
        assert len(pages) == len(set(pages))
        assert len(pages) + cache.num_free_pages == cache.num_pages


def test_written_values_land_in_their_slots(engine_fp32):
    from nemodiff.runtime.model.loader import load_engine
    from nemodiff.runtime.model.segments import Pattern, Segment

    engine = load_engine(engine_fp32, device="cpu")
    cfg = engine.config.model
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 8, torch.float32)
    cache.add_request(0)
    cache.add_request(1)
    cache.append(1, 4)  # request 1 owns the first page, so request 0's pages are not 0..n
    cache.reserve(0, 6)
    engine.model.forward([Segment(0, [1, 2, 3, 4, 5, 6], list(range(6)), 0, Pattern.CAUSAL,
                                  write_kv=[True, True, True, True, False, False])], cache)
    slots = cache.slots(0, torch.arange(6))
    assert cache.k[:, slots[:4]].abs().sum(-1).gt(0).all()
    assert cache.k[:, slots[4:]].abs().sum() == 0  # unwritten tokens leave no trace
    assert cache.k[:, cache.slots(1, torch.arange(4))].abs().sum() == 0

"""Incremental detokenization, stop strings and streaming deltas against full decodes.

Random token sequences (multi-byte characters split across tokens included) are fed in random
chunks. The incremental text must equal a full decode, `Request.append` must keep exactly the
tokens, finish reason and text of a token-by-token implementation that decodes the whole output
after every token, and streamed deltas must concatenate to the final text.
"""

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models

from nemodiff.runtime.request import Request, SamplingParams
from nemodiff.runtime.text.detokenizer import IncrementalDetokenizer
from nemodiff.runtime.text.streaming import TextStream
from nemodiff.runtime.text.tokenizer import EngineTokenizer

EOS = 2


def sentencepiece_style(folder: Path) -> Path:
    """A SentencePiece-style tokenizer: "▁" marks spaces (dropped at the start of a decode) and
    multi-byte characters may come as byte-fallback pieces, one byte per token."""
    pieces = ["<unk>", "<s>", "</s>", "▁the", "▁model", "▁é", "▁日本", "语", "言", "▁draft", "ver", "ify", "▁",
              "a", "b", "<0xE6>", "<0x97>", "<0xA5>", "<0xC3>", "<0xA9>", "▁x", "y"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.add_special_tokens(pieces[:3])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module", params=["random-checkpoint", "bundled", "sentencepiece-style"])
def tokenizer(request, engine_fp32, tmp_path_factory):
    if request.param == "random-checkpoint":
        return EngineTokenizer(engine_fp32)
    if request.param == "bundled":
        return EngineTokenizer(Path(__file__).parents[1] / "models" / "nld-tiny")
    return EngineTokenizer(sentencepiece_style(tmp_path_factory.mktemp("spm")))


def units(tokenizer) -> list[list[int]]:
    """Pieces a model can emit one after another: single tokens, and whole byte-fallback groups
    (a character split over one token per byte). A lone fallback byte is junk that no decoder
    can settle, so it is left out."""
    vocab = tokenizer.vocab_size
    groups = [[tokenizer.token_id(f"<0x{b:02X}>") for b in ch.encode()] for ch in "日é"]
    if all(None not in g for g in groups):
        byte_ids = {i for g in groups for i in g}
        return [[i] for i in range(3, vocab) if i not in byte_ids] + groups
    return [[i] for i in range(3, vocab)]


def sequences(tokenizer, count, length, seed):
    rng = random.Random(seed)
    text_ids = tokenizer.encode("the model é ü 日本 语言 draft verify 日本語 émigré", add_special_tokens=False)
    text = [[i] for i in text_ids if i > EOS]
    pool = units(tokenizer)
    for _ in range(count):
        ids = []
        while len(ids) < length:
            ids += rng.choice(text) if text and rng.random() < 0.5 else rng.choice(pool)
        yield ids, rng


def chunks(ids, rng):
    at = 0
    while at < len(ids):
        size = rng.choice([1, 1, 2, 3, 5, 8])
        yield ids[at: at + size]
        at += size


def test_incremental_text_equals_a_full_decode(tokenizer):
    for ids, rng in sequences(tokenizer, 40, 60, seed=0):
        out: list[int] = []
        detok = IncrementalDetokenizer(tokenizer.decode, out)
        for part in chunks(ids, rng):
            out.extend(part)
            detok.update()
            full = tokenizer.decode(out)
            if not full.endswith("\ufffd"):  # (a decoder may rewrite a byte run until its character completes)
                assert full.startswith(detok.text)
        full = tokenizer.decode(out)
        assert detok.text == full or (full.endswith("\ufffd") and full.startswith(detok.text))


def token_by_token(tokenizer, ids, params):
    """The reference: one token at a time, the whole output decoded after each."""
    out, reason, cut = [], None, None
    for token in ids:
        out.append(token)
        if token == EOS and not params.ignore_eos or token in params.stop_token_ids:
            reason = "eos" if token == EOS else "stop"
            break
        text = tokenizer.decode(out)
        hits = [text.find(s) for s in params.stop if s and s in text]
        if hits:
            reason, cut = "stop", min(hits)
            break
        if len(out) >= params.max_new_tokens:
            reason = "length"
            break
    text = tokenizer.decode(out)
    return out, reason, text[:cut] if cut is not None else text


def test_append_equals_token_by_token_stop_rules(tokenizer):
    for ids, rng in sequences(tokenizer, 60, 50, seed=1):
        full = tokenizer.decode(ids)
        start = rng.randrange(len(full))
        stop = [full[start: start + rng.choice([1, 2, 4])]] if rng.random() < 0.8 else []
        if rng.random() < 0.3:
            ids[rng.randrange(len(ids))] = EOS
        params = SamplingParams(max_new_tokens=rng.choice([7, 30, 50]), stop=stop,
                                stop_token_ids=[ids[rng.randrange(len(ids))]] if rng.random() < 0.2 else [])
        request = Request(0, [1], params, frozenset({EOS}), tokenizer.decode)
        stream, streamed = TextStream(request), []
        for part in chunks(ids, rng):
            request.append(part)
            streamed.append(stream.delta())
            if request.finished:
                break
        want_ids, want_reason, want_text = token_by_token(tokenizer, ids, params)
        assert request.output_ids == want_ids
        assert request.finish_reason == want_reason
        if request.finished:
            assert request.text == want_text
            assert "".join(streamed) == want_text

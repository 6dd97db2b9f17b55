"""Streaming detokenization on the real Gemma 3 tokenizer: same text as `decode`, O(n) work.

The reference is `Tokenizer.decode` of all ids at once (sentencepiece in C++); the streamed
pieces must concatenate to it exactly and never carry half a UTF-8 character.
"""

from __future__ import annotations

import random

import pytest

from gemma_jax import embedded_gguf
from gemma_jax.tokenizer import SPACE, IncrementalDecoder, Tokenizer

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n",
    "  leading spaces, trailing spaces   ",
    "multiple    spaces\tand\ttabs\n\n\nnewlines",
    "café, naïve, Ångström, jalapeño, Straße",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀🫨🦩 and flags 🇫🇷 and a family 👩\u200d👩\u200d👧",
    "🦩",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "def main():\n    return {'a': [1, 2, 3]}\n",
    " ",
    "\n",
    "▁literal escaped space marker▁",
    "mixed: a😀b日c\u0301d 🦩\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_gguf.gguf_path())


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def check(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    pieces = stream(tokenizer, ids)
    expected = tokenizer.decode(ids)
    assert "".join(pieces) == expected, (ids, pieces)
    if "\ufffd" not in expected:
        assert not any("\ufffd" in p for p in pieces), (ids, pieces)
    return pieces


@pytest.mark.parametrize("add_bos", [True, False])
def test_corpus_streams_to_decode(tok, add_bos):
    split_characters = 0
    for text in CORPUS:
        ids = tok.encode(text, add_bos=add_bos)
        split_characters += sum(tok.sp.IsByte(i) for i in ids)
        pieces = check(tok, ids)
        if SPACE not in text:  # a literal "▁" decodes as a space
            assert "".join(pieces) == text
    assert split_characters >= 8  # 🫨 and 🦩 are four byte-fallback ids each


def test_every_prefix_of_the_corpus(tok):
    """A stream cut anywhere, mid-character included, flushes to what decode gives for that cut."""
    ids = tok.encode("".join(CORPUS))
    for end in range(len(ids) + 1):
        check(tok, ids[:end])


def test_piece_boundaries_are_character_boundaries(tok):
    ids = tok.encode("ok 🦩 fin", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids[2:6]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]
    assert stream(tok, ids) == ["ok", " ", "", "", "", "🦩", " fin", ""]


def test_invalid_bytes_and_control_ids(tok):
    byte = {int(tok.id_to_piece(i)[3:5], 16): i for i in range(tok.vocab_size) if tok.sp.IsByte(i)}
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    hello = tok.encode("hello", add_bos=False)
    cases = [
        [byte[0xF0], pad, byte[0x9F], byte[0x98], byte[0x80]],  # a control id settles the F0 as U+FFFD
        [byte[0xF0], byte[0x9F], *hello],  # a text id settles an incomplete character
        [byte[0x80]] * 50 + hello,  # stray continuation bytes: invalid whatever follows
        [byte[0xE4], byte[0xB8], byte[0xAD], byte[0x80], byte[0xE4], byte[0xB8], byte[0xAD]],
        [byte[0xC3], byte[0xA9], byte[0x80], byte[0xF8], byte[0x88], byte[0x80], byte[0x80], byte[0x80]],
        [bos, bos, pad, *hello, eos, pad, pad, *hello, eos],
        [pad] * 100 + [byte[0xF0], byte[0x9F], byte[0x98], byte[0x80]] + [eos] * 100,
    ]
    for ids in cases:
        check(tok, ids)


def test_seeded_random_ids(tok):
    """300 random sequences: any id, heavy on byte-fallback, control and whitespace ids."""
    rng = random.Random(1234)
    bytes_ids = [i for i in range(tok.vocab_size) if tok.sp.IsByte(i)]
    lead_and_continuation = [i for i in bytes_ids if int(tok.id_to_piece(i)[3:5], 16) >= 0x80]
    special = [tok.bos_id, tok.eos_id, tok.pad_id, 3, tok.start_of_turn_id, tok.end_of_turn_id]
    spaces = [tok.piece_to_id(p) for p in ("▁", "▁▁", "▁▁▁▁", "\n", "\n\n")]
    emoji = tok.encode("😀🫨🦩日本", add_bos=False)
    pools = [list(range(tok.vocab_size)), bytes_ids, lead_and_continuation, special, spaces, emoji]
    with_fffd = 0
    for _ in range(300):
        weights = [rng.random() for _ in pools]
        ids = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randint(1, 60))]
        pieces = check(tok, ids)
        with_fffd += "\ufffd" in "".join(pieces)
    assert 0 < with_fffd < 300  # the sample holds both clean and invalid byte sequences


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting the ids it is asked to decode."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer.sp)
        self.decoded_ids = 0

    def decode(self, ids):
        ids = list(ids)
        self.decoded_ids += len(ids)
        return super().decode(ids)


def test_work_is_linear(tok):
    rng = random.Random(7)
    words = tok.encode("".join(CORPUS), add_bos=False)
    ids = [tok.bos_id] + [rng.choice(words) for _ in range(2000)]
    counting = CountingTokenizer(tok)
    pieces = stream(counting, ids)
    assert "".join(pieces) == tok.decode(ids)
    n = len(ids)
    assert counting.decoded_ids < 5 * n, counting.decoded_ids  # whole-text re-decoding is ~n^2/2

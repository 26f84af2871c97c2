"""The streamer cuts text where the reference does, and the chunks add up."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from tidal.engine.detokenizer import TextStreamer, is_cjk


def _tokenizer(words: list[str]) -> Tokenizer:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    s = TextStreamer(tok)
    chunks = [s.push(i) for i in ids] + [s.finish()]
    return [c for c in chunks if c]


def test_chunks_end_at_spaces_and_join_to_the_text():
    tok = _tokenizer(["hello", "big", "wide", "world", "##s"])
    ids = [1, 2, 3, 4, 5]  # hello big wide world ##s -> "hello big wide worlds"
    chunks = _stream(tok, ids)
    assert chunks == ["hello ", "big ", "wide ", "worlds"]
    assert "".join(chunks) == tok.decode(ids)


def test_newline_flushes_and_restarts():
    tok = _tokenizer(["a", "\n", "b"])
    assert _stream(tok, [1, 2, 3]) == ["a \n", "b"]


def test_cjk_characters_are_emitted_at_once():
    tok = _tokenizer(["日", "本", "go"])
    assert is_cjk("日") and not is_cjk("g")
    assert _stream(tok, [1, 2, 3]) == ["日", " 本", " ", "go"]

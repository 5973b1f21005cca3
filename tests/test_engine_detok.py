"""Streaming text: whole characters only, and never a piece of a stop string."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.detok import Detokenizer, bytes_to_unicode, token_bytes_table
from nanoseek.tokenizer import Tokenizer

TEXT = "naïve café — 中文字符 and emoji 🙂🚀 done.\nUser: hi"


@pytest.fixture(scope="module")
def tok():
    # a small vocabulary, so multi-byte characters stay split over several byte tokens
    return Tokenizer.train(["plain ascii words for merges, café naïve"] * 20, vocab_size=300)


def test_byte_table_matches_decode(tok):
    table = token_bytes_table(tok)
    assert table is not None and len(bytes_to_unicode()) == 256
    ids = tok.encode(TEXT + "<think>x</think>")
    assert b"".join(table[i] for i in ids).decode() == tok.decode(ids) == TEXT + "<think>x</think>"


@pytest.mark.parametrize("byte_level", [True, False])
def test_no_replacement_char_mid_stream(tok, byte_level):
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the hazard is real: some tokens are half-characters
    d = Detokenizer(tok, table=token_bytes_table(tok) if byte_level else None)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)
    assert "中" in pieces  # a character is emitted as soon as its last byte arrives


def test_stop_string_never_partially_emitted(tok):
    ids = tok.encode(TEXT)
    d = Detokenizer(tok, stop=["\nUser:", "zzz"], table=token_bytes_table(tok))
    out = ""
    for i in ids:
        out += d.add(i)
        assert "\n" not in out  # "\n" could start "\nUser:": it is held until ruled out or matched
        if d.stopped:
            break
    assert d.stopped and out + d.flush() == "naïve café — 中文字符 and emoji 🙂🚀 done." == d.text
    # held-back text that turns out not to be a stop string is released
    d = Detokenizer(tok, stop=["done!"], table=token_bytes_table(tok))
    assert "".join(d.add(i) for i in tok.encode("well done.")) + d.flush() == "well done."


def test_flush_shows_an_unfinished_final_character(tok):
    ids = tok.encode("é")
    d = Detokenizer(tok, table=token_bytes_table(tok))
    if len(ids) > 1:
        assert d.add(ids[0]) == "" and d.flush() == "\ufffd"


def test_engine_streams_text_and_stops_on_strings(tmp_path):
    """The scripted checkpoint answers "The answer is yes." after its think trace."""
    from nanoseek.serve.testing import CONTENT, REASONING, make_scripted_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = make_scripted_checkpoint(tmp_path / "ckpt")
        eng = Engine(str(ckpt), device="cpu")
        prompt = eng.tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
        events = list(eng.stream(prompt, SamplingParams(max_tokens=30, temperature=0)))
        text = "".join(e.text_delta for e in events)
        assert text == f"<think>\n{REASONING}</think>{CONTENT}"  # EOS ends it and is not shown
        assert events[-1].finish_reason == "stop" and events[-1].num_completion_tokens == 12
        out = eng.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=[" is y"]))[0]
        assert out.text == f"<think>\n{REASONING}</think>The answer" and out.finish_reason == "stop"
        streamed = "".join(e.text_delta for e in eng.stream(prompt, SamplingParams(temperature=0, stop=[" is y"])))
        assert streamed == out.text
    finally:
        torch.set_num_threads(n)

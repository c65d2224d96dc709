"""Streaming: text pieces as decode chunks finish, joined equal to generate's text, characters whole."""

from __future__ import annotations

import numpy as np
import pytest

import jaxvlm
from jaxvlm import generate as gen
from jaxvlm.engine import Engine
from jaxvlm.processor import text_pieces

IMAGE = "examples/shapes.png"


@pytest.fixture(scope="module")
def model():
    return jaxvlm.load()


def test_pieces_join_to_generate_and_come_early(model):
    for prompt in ("caption en", "what color is the square?"):
        pieces = list(model.stream(prompt, image=IMAGE, max_new_tokens=24))
        assert "".join(pieces) == model.generate(prompt, image=IMAGE, max_new_tokens=24)
    pieces = list(model.stream("caption en", image=IMAGE))
    # a piece a token: the first is the prefill's, the others come a decode call's worth at a time
    tokens = model.generate("caption en", image=IMAGE, logprobs=True).token_ids
    assert len(pieces) == len(tokens) - 1 and pieces[0] == "a"  # (the end-of-sequence token has no text)


def test_tokens_arrive_a_chunk_at_a_time(model):
    engine = Engine(model, slots=1, cache_size=320, chunk=4)
    engine.submit_text("caption en", IMAGE, max_tokens=20)
    chunks = [event.tokens for _ in range(100) if not engine.idle for event in engine.step()]
    assert len(chunks[0]) == 1 and all(len(c) <= 4 for c in chunks[1:])
    whole = model.generate_ids(*model.encode("caption en", image=IMAGE), max_new_tokens=20)[0]
    streamed = sum(chunks, [])
    assert streamed == list(whole[:len(streamed)])


def test_multi_byte_characters_are_never_split(qwen_tokenizer, tmp_path):
    """A byte-level tokenizer spells an unseen character as several byte tokens: no piece ends inside it."""
    from jaxvlm.config import TokensConfig
    from jaxvlm.tokenizer import Tokenizer
    qwen_tokenizer(str(tmp_path))
    tok = Tokenizer.from_dir(tmp_path, TokensConfig(eos_ids=(1,)))
    text = "hello ü, é — 日本 🙂 jax"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the characters above take several tokens each
    for size in (1, 2, 3):
        pieces = list(text_pieces(tok, (ids[i:i + size] for i in range(0, len(ids), size))))
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_checks_its_arguments_at_once(model):
    with pytest.raises(ValueError, match="stream takes one prompt"):
        model.stream(["caption en"], image=[IMAGE])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.stream("caption en", image=IMAGE, max_new_tokens=0)


def test_batch_sizes_share_buckets():
    assert [gen.batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 24]
    assert gen.batch_bucket(3, multiple=8) == 8 and gen.batch_bucket(9, multiple=4) == 16


def test_a_new_batch_size_in_a_bucket_does_not_compile(model, caplog):
    import jax
    compiled = lambda: [r for r in caplog.records if "Compiling" in r.getMessage()]
    model.generate(["count shapes"] * 3, image=[IMAGE] * 3, max_new_tokens=4)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        model.generate(["count shapes"] * 4, image=[IMAGE] * 4, max_new_tokens=4)
        assert not compiled()
        model.generate(["count shapes"] * 5, image=[IMAGE] * 5, max_new_tokens=4)  # the next bucket, 8
        assert compiled()

"""Training rows to batches: layout, determinism, and unusable rows skipped with a warning naming them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxvlm.data import RowBatches, RowError, encode_row
from jaxvlm.prompts import build_prompt
from tests import tiny_training as tiny


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def test_row_layout(tok):
    row = {"image": tiny.rows(1)[0]["image"], "prompt": "count shapes", "answer": "2"}
    example = encode_row(tiny.TINY, tok, row)
    prompt = build_prompt(tiny.TINY, tok, "count shapes", with_image=True)
    np.testing.assert_array_equal(example.ids[:example.prefix_length], prompt)
    answer = example.ids[example.prefix_length:]
    assert list(answer) == tok.encode("2", add_bos=False) + [1]  # the answer, then EOS
    assert example.pixels.shape == (16, 16, 3)


def test_batches_are_a_function_of_the_step(tok):
    a, b = tiny.batches(tok), tiny.batches(tok)
    first, again, other = a(3), b(3), a(4)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.pixels, again.pixels)
    assert not np.array_equal(first.tokens, other.tokens)
    # right-padded: the valid slots come first; the answer follows the prefix and is never padding
    assert (first.valid[:, :-1] >= first.valid[:, 1:]).all()
    assert not (first.loss_mask & first.prefix).any() and not (first.loss_mask & ~first.valid).any()


def test_every_row_is_seen_once_per_epoch(tok):
    rows = [{"image": r["image"], "prompt": f"caption en {i}", "answer": r["answer"]}
            for i, r in enumerate(tiny.rows(12))]
    batches = RowBatches(tiny.TINY, tok, rows, batch_size=4)
    seen = [tok.decode(t[p]) for s in range(3) for t, p in zip(batches(s).tokens, batches(s).prefix)]
    assert len(seen) == 12 and len(set(seen)) == 12


def test_row_without_answer_is_skipped_and_named(tok, caplog):
    rows = tiny.rows(4)
    rows[1] = dict(rows[1], answer="")
    rows[2] = {k: v for k, v in rows[2].items() if k != "answer"}
    with caplog.at_level(logging.WARNING, "jaxvlm.data"):
        batch = RowBatches(tiny.TINY, tok, rows, batch_size=4)(0)
    assert "row 1: no answer ('answer' is '')" in caplog.text and "row 2: no answer ('answer' is None)" in caplog.text
    assert batch.tokens.shape[0] == 4  # good rows stand in for the skipped ones


def test_image_that_fails_to_load_mid_dataset_is_skipped_and_named(tok, tmp_path, caplog):
    rows = tiny.rows(6)
    good, broken, missing = tmp_path / "good.png", tmp_path / "broken.png", tmp_path / "gone.png"
    rows[0]["image"].save(good)
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    rows[3] = dict(rows[3], image=str(broken))
    rows[4] = dict(rows[4], image=str(missing))
    rows[5] = dict(rows[5], image=str(good))
    with caplog.at_level(logging.WARNING, "jaxvlm.data"):
        batches = RowBatches(tiny.TINY, tok, rows, batch_size=3)
        for step in range(4):
            assert np.isfinite(batches(step).pixels).all()
    assert f"row 3: image: {broken}: cannot read the image" in caplog.text
    assert f"row 4: image: {missing}: no such file" in caplog.text
    assert caplog.text.count("row 3:") == 1  # named once, then left out quietly


def test_no_usable_row_is_an_error(tok):
    rows = [{"image": None, "prompt": "count shapes", "answer": "1"}] * 3
    with pytest.raises(ValueError, match="none of the 3 rows is usable"):
        RowBatches(tiny.TINY, tok, rows, batch_size=2)(0)
    with pytest.raises(RowError, match="row 9: 'prompt' must be a string"):
        encode_row(tiny.TINY, tok, {"prompt": None, "answer": "x"}, "row 9")

"""Classification heads: parity with transformers' Phi3ForSequenceClassification and
Phi3ForTokenClassification on tiny random models, converted from their saved folders."""

from __future__ import annotations

import numpy as np
import pytest

from tests import hf_models

LABELS = {"0": "negative", "1": "neutral", "2": "positive"}


@pytest.fixture(scope="module", params=["Phi3ForSequenceClassification", "Phi3ForTokenClassification"])
def head_model(request, convert_and_load):
    hf = hf_models.build("phi3", architecture=request.param, id2label=LABELS,
                         label2id={v: int(k) for k, v in LABELS.items()})
    return request.param, hf, convert_and_load(hf, request.param)


def right_pad(rows, pad_id=0):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def hf_head_logits(model, ids, mask):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def test_head_config_from_the_checkpoint(head_model):
    name, hf, jx = head_model
    head = jx.config.head
    assert head.labels == ("negative", "neutral", "positive")
    assert head.kind == ("sequence_classification" if "Sequence" in name else "token_classification")
    assert head.bias == ("Token" in name)  # transformers: the token head has a bias, the sequence head none
    assert "lm_head" not in jx.params["decoder"]


def test_logits_match_transformers(head_model):
    """A right-padded batch (transformers then numbers positions as jaxvlm does): the sequence head reads
    each row's last real token, the token head every token."""
    name, hf, jx = head_model
    rows = hf_models.prompts(3, [9, 4, 7])
    ids, mask = right_pad(rows)
    got, want = jx.classify(ids, mask), hf_head_logits(hf, ids, mask)
    if "Sequence" in name:
        assert got.shape == (3, 3)
        diff = np.abs(got - want).max()
    else:
        assert got.shape == (3, 9, 3)
        diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"{name}: max |logits diff| {diff}"


def test_padding_does_not_change_a_row(head_model):
    name, _, jx = head_model
    rows = hf_models.prompts(4, [6, 10])
    left = hf_models.left_pad(rows)
    batch = jx.classify(*left)
    alone = jx.classify(rows[0][None])
    row = batch[0] if "Sequence" in name else batch[0, -6:]
    np.testing.assert_allclose(row, alone[0], atol=1e-5)


def test_head_models_refuse_generation(head_model):
    _, _, jx = head_model
    ids = hf_models.prompts(5, [5])[0][None]
    with pytest.raises(ValueError, match="use classify"):
        jx.logits(ids)
    with pytest.raises(ValueError, match="use classify"):
        jx.generate_ids(ids, max_new_tokens=2)

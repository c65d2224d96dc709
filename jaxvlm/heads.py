"""Classification heads over a decoder's final hidden states, as transformers' `...ForSequenceClassification`
and `...ForTokenClassification` put them: one Linear ("score") to the labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.config import HeadConfig
from jaxvlm.layers import Dtype, Einsum


def last_token(x: jax.Array, valid: jax.Array) -> jax.Array:
    """x: [B, T, ...] at each row's last real token (the rightmost valid slot) -> [B, ...].

    transformers takes the rightmost token that is not the pad id; with the attention mask marking the
    pad tokens this is the same token, for left- and right-padded rows alike.
    """
    T = valid.shape[1]
    index = T - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


class ClassificationHead(nn.Module):
    config: HeadConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, valid: jax.Array) -> jax.Array:
        """hidden: [B, T, D]; valid: bool[B, T] -> float32 logits [B, labels] (sequence) or [B, T, labels]."""
        c = self.config
        if c.kind == "sequence_classification":
            hidden = last_token(hidden, valid)[:, None]
        score = Einsum("BTD,DC->BTC", (hidden.shape[-1], c.num_labels), ("embed", "labels"), c.bias,
                       dtype=self.dtype, out_dtype=jnp.float32, name="score")
        logits = score(hidden).astype(jnp.float32)
        return logits[:, 0] if c.kind == "sequence_classification" else logits

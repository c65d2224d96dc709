"""Training losses: next-token cross-entropy on the answer tokens, and the image-text contrastive losses
of CLIP (softmax over the batch) and SigLIP (a sigmoid per pair). All computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting each masked token from the ones before it, and the token count.

    logits: float[B, T, V]; tokens: int[B, T]; loss_mask: bool[B, T], True at the tokens to predict (a
    prefix-LM's suffix: the answer and its end-of-sequence token). Position t's logits predict token
    t + 1, so the first token is never a target. The mean is over target tokens, as transformers takes it.
    """
    targets, weights = tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    count = weights.sum()
    return (losses * weights).sum() / jnp.maximum(count, 1.0), count


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric softmax loss: each image must pick its own text out of the batch, and each text
    its own image. image_embeds, text_embeds: [B, E], pair i matching; logit_scale: the log temperature."""
    logits = _normalize(text_embeds) @ _normalize(image_embeds).T * jnp.exp(logit_scale)  # [B_text, B_image]
    labels = jnp.arange(logits.shape[0])
    texts = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    images = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (texts + images) / 2


def siglip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array) -> jax.Array:
    """SigLIP's sigmoid loss: every (text, image) pair is its own binary problem, matching on the diagonal
    and not elsewhere; summed over images and averaged over texts, as big_vision does. No batch-wide
    softmax, so no all-gather of the normaliser across devices."""
    logits = _normalize(text_embeds) @ _normalize(image_embeds).T * jnp.exp(logit_scale) + logit_bias
    signs = 2 * jnp.eye(logits.shape[0]) - 1  # +1 on the diagonal, -1 elsewhere
    return -jax.nn.log_sigmoid(signs * logits).sum(axis=-1).mean()

"""Losses and pseudo-labels (paper eqs. 5-9).

Labels are int32 maps with IGNORE (-1) where a pixel carries no label."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -1
PSEUDO_LABEL_THRESHOLD = 0.7


def pseudo_labels(logits: jax.Array, threshold: float = PSEUDO_LABEL_THRESHOLD) -> jax.Array:
    """Eqs. 5-6: softmax over the 2 logits; argmax where max prob > threshold, else IGNORE."""
    probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)  # eq. 5
    labels = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.max(probabilities, axis=-1) > threshold, labels, IGNORE)  # eq. 6


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Eq. 9: mean over labelled pixels of -log p(label); IGNORE pixels are left out (all pixels
    are labelled for source ground truth, so this is eq. 9's 1/(N_s H W) sum exactly)."""
    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != IGNORE
    picked = jnp.take_along_axis(log_probabilities, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def consistency_mse(restored_logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Eq. 7: mean over P (pixels with a pseudo-label, and inside the restored view) of
    (S'_t - Ŝ_t)^2, S'_t the anomaly probability of the segmentation head on the augmented image
    mapped back by the inverse transform."""
    anomaly_probability = jax.nn.softmax(restored_logits.astype(jnp.float32), axis=-1)[..., 1]
    in_p = labels != IGNORE
    if valid is not None:
        in_p = in_p & valid
    squared = (anomaly_probability - labels.astype(jnp.float32)) ** 2
    return jnp.sum(jnp.where(in_p, squared, 0.0)) / jnp.maximum(jnp.sum(in_p), 1)


def total_loss(source_ce, target_ce, target_mse, lambda1: float = 1.0, lambda2: float = 1.0):
    """Eq. 8: L = L_s^ce + l1 L_t^ce + l2 L_t^mse."""
    return source_ce + lambda1 * target_ce + lambda2 * target_mse

"""INP-Former (the INP-Former++ paper's sections 3.2-3.4), few-shot: a frozen DINOv2, the INP
extractor, a bottleneck and the INP-guided decoder, trained on the N normal images of a class to
reconstruct the encoder's layer groups; the anomaly map is the reconstruction error.

- Encoder groups: the hidden states of 8 consecutive layers (ViT-B: layers 3-10, one-based) in two
  groups of 4 (Dinomaly's group-to-group reconstruction); a group's target is its layers' mean. A
  shallower encoder gives fewer layers, one group when it has one.
- INP extractor (eq. 1): M learnable tokens cross-attend (one pre-norm transformer block) to
  F_Q = the sum of the selected layers: the INPs P (M, C).
- Bottleneck: the mean of the selected layers through an MLP with dropout (Dinomaly's).
- INP-guided decoder (eq. 4): per layer, queries from the features, keys and values from the INPs,
  A = ReLU(Q K^T / sqrt(d)) (the scale as in the official attention), no first residual, then a
  pre-norm FFN with its residual. Decoder layers are grouped like the encoder's.
- Losses: INP coherence (eq. 2, "hard") or INP-Former++'s soft coherence (eq. 3, "soft"); the soft
  mining loss (eq. 5: the gradient of each decoder feature scaled by (M / mean M)^gamma for a
  global-cosine and an MSE term); L = L_sm + lambda L_c (eq. 6), gamma = 3, lambda = 0.2.
- Anomaly map: per patch the mean over groups of (1 - cos(f_Q, f_D)), upsampled bilinearly and
  smoothed with the project's Gaussian; image score: the mean of the top 1% of the map.

INP-Former++'s options (`nexvitad_jax.peers.residual`): `residual_head` trains a segmentation head
on the feature residuals of pseudo anomalies (eqs. 7-8; the residuals stop-gradiented, the head
with its own optimizer, so the reconstruction model never sees pseudo anomalies) and averages its
mask into the map (eq. 9); `map_l2` adds eq. 9's L2 term to the reconstruction error map.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class INPFormerOptions:
    """prototypes: M; decoder_layers: 8; heads: attention heads (0: the encoder's); coherence:
    "hard" (eq. 2) or "soft" (eq. 3); gamma, coherence_weight: eqs. 5-6; dropout: the bottleneck's;
    steps, batch_size, learning_rate, weight_decay: few-shot training (AdamW, global-norm clip 1);
    checkpoint_every: steps between resumable checkpoints; sigma: map smoothing; residual_head:
    INP-Former++'s segmentation head on pseudo-anomaly residuals (eqs. 7-9); map_l2: eq. 9's
    A_rec = mean_g (1 - cos + ||f_Q - f_D||) / 2 instead of mean_g (1 - cos)."""

    prototypes: int = 6
    decoder_layers: int = 8
    heads: int = 0
    coherence: str = "hard"
    gamma: float = 3.0
    coherence_weight: float = 0.2
    dropout: float = 0.2
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    checkpoint_every: int = 50
    sigma: float = 4.0
    residual_head: bool = False
    map_l2: bool = False


def encoder_layer_groups(num_layers: int) -> tuple[tuple[int, ...], ...]:
    """0-based encoder layers in groups: ViT-B (12): (2..5), (6..9); 8 layers ending 2 before the last
    in general, fewer when the encoder is shallower; two groups when there are >= 2 layers."""
    last = max(0, num_layers - 3)
    layers = tuple(range(max(0, last - 7), last + 1)) if num_layers >= 3 else tuple(range(num_layers))
    if len(layers) < 2:
        return (layers,)
    half = len(layers) // 2
    return layers[:half], layers[half:]


def cosine(a: jax.Array, b: jax.Array, axis: int = -1) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=axis)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis), 1e-8)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        self.fc1, self.fc2 = nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.fc2(self.dropout(jax.nn.gelu(self.fc1(x), approximate=False))))


class CrossAttention(nnx.Module):
    """Multi-head attention of queries x (B, T, C) over y (B, S, C); `relu` replaces the softmax
    (the INP-guided decoder)."""

    def __init__(self, dim: int, heads: int, *, relu: bool = False, rngs: nnx.Rngs):
        self.heads, self.relu = heads, relu
        self.q, self.k, self.v = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(3))
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x, y):
        batch, tokens, dim = x.shape
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, dim // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(y)), split(self.v(y))
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim // self.heads)
        weights = jax.nn.relu(logits) if self.relu else jax.nn.softmax(logits, axis=-1)
        return self.proj(jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, tokens, dim))


class INPExtractor(nnx.Module):
    """Eq. 1: T' = Attention(T, F_Q) + T, P = FFN(T') + T' (pre-norm), M learnable tokens T."""

    def __init__(self, dim: int, heads: int, prototypes: int, *, rngs: nnx.Rngs):
        self.tokens = nnx.Param(nnx.initializers.truncated_normal(0.02)(rngs.params(), (1, prototypes, dim)))
        self.norm_q, self.norm_kv, self.norm_ffn = (nnx.LayerNorm(dim, rngs=rngs) for _ in range(3))
        self.attention = CrossAttention(dim, heads, rngs=rngs)
        self.ffn = Mlp(dim, 4 * dim, rngs=rngs)

    def __call__(self, features):
        tokens = jnp.broadcast_to(self.tokens.value, (features.shape[0], *self.tokens.value.shape[1:]))
        tokens = tokens + self.attention(self.norm_q(tokens), self.norm_kv(features))
        return tokens + self.ffn(self.norm_ffn(tokens))


class DecoderLayer(nnx.Module):
    """Eq. 4: f' = ReLU(Q K^T) V with Q from f, K and V from the INPs (no residual), f = FFN(f') + f'."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm, self.norm_ffn = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attention = CrossAttention(dim, heads, relu=True, rngs=rngs)
        self.ffn = Mlp(dim, 4 * dim, rngs=rngs)

    def __call__(self, x, prototypes):
        x = self.attention(self.norm(x), prototypes)
        return x + self.ffn(self.norm_ffn(x))


class INPFormer(nnx.Module):
    """Encoder layers (L, B, N, C) -> (INPs (B, M, C), decoder layer outputs (layers, B, N, C))."""

    def __init__(self, dim: int, heads: int, options: INPFormerOptions, *, rngs: nnx.Rngs):
        self.extractor = INPExtractor(dim, heads, options.prototypes, rngs=rngs)
        self.bottleneck = Mlp(dim, 4 * dim, dropout=options.dropout, rngs=rngs)
        self.decoder = nnx.List([DecoderLayer(dim, heads, rngs=rngs) for _ in range(options.decoder_layers)])

    def __call__(self, layers: jax.Array) -> tuple[jax.Array, jax.Array]:
        prototypes = self.extractor(jnp.sum(layers, axis=0))
        x = self.bottleneck(jnp.mean(layers, axis=0))
        outputs = []
        for layer in self.decoder:  # 8 small layers of distinct weights, unrolled at trace time
            x = layer(x, prototypes)
            outputs.append(x)
        return prototypes, jnp.stack(outputs)


def group_means(layers: jax.Array, groups: int) -> jax.Array:
    """(L, B, N, C) -> (groups, B, N, C): the mean of each consecutive block of L / groups layers."""
    return jnp.mean(layers.reshape(groups, layers.shape[0] // groups, *layers.shape[1:]), axis=1)


def coherence_loss(features: jax.Array, prototypes: jax.Array, kind: str) -> jax.Array:
    """F_Q (B, N, C), INPs (B, M, C): eq. 2 (hard: mean distance to the nearest INP) or eq. 3 (soft:
    1 - global cosine between F_Q and its softmax-weighted INP reconstruction)."""
    similarity = cosine(features[:, :, None], prototypes[:, None], axis=-1)  # (B, N, M)
    if kind == "hard":
        return jnp.mean(jnp.min(1.0 - similarity, axis=-1))
    weights = jax.nn.softmax(similarity, axis=-1)
    rebuilt = jnp.einsum("bnm,bmc->bnc", weights, prototypes)
    return jnp.mean(1.0 - cosine(features.reshape(features.shape[0], -1), rebuilt.reshape(rebuilt.shape[0], -1)))


def scaled_gradient(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x in the forward pass; its gradient multiplied by `weight` (stop-gradient) in the backward."""
    weight = jax.lax.stop_gradient(weight)
    return jax.lax.stop_gradient(x) + weight * (x - jax.lax.stop_gradient(x))


def soft_mining_loss(targets: jax.Array, outputs: jax.Array, gamma: float) -> jax.Array:
    """Eq. 5 over groups: targets, outputs (G, B, N, C). Per group the regional cosine distance and
    squared error (B, N) over their batch mean, to the power gamma, scale the outputs' gradients;
    L = mean_g (1 - global cosine per image) + mean_g mean_patches squared error."""
    targets = jax.lax.stop_gradient(targets)
    regional = {"cos": 1.0 - cosine(targets, outputs), "mse": jnp.sum((targets - outputs) ** 2, axis=-1)}
    weight = {t: (m / jnp.maximum(jnp.mean(m, axis=(1, 2), keepdims=True), 1e-12)) ** gamma
              for t, m in regional.items()}
    cos_out = scaled_gradient(outputs, weight["cos"][..., None])
    mse_out = scaled_gradient(outputs, weight["mse"][..., None])
    flat = lambda t: t.reshape(*t.shape[:2], -1)  # noqa: E731
    loss_cos = jnp.mean(1.0 - cosine(flat(targets), flat(cos_out)))
    loss_mse = jnp.mean(jnp.sum((targets - mse_out) ** 2, axis=-1))
    return loss_cos + loss_mse


def reconstruction_map(targets: jax.Array, outputs: jax.Array) -> jax.Array:
    """(G, B, N, C) -> (B, N): the mean over groups of 1 - cos(f_Q, f_D) per patch."""
    return jnp.mean(1.0 - cosine(targets, outputs), axis=0)

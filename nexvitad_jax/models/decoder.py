"""NexViTAD multi-task decoder heads (paper section 3.1.2), stacked: heads of one shape share
variables with a leading head axis.

- `SegmentationHead`: U-Net over F_4..F_1 (eq. 4): 2x2 stride-2 transposed conv (to the block's
  width, or keeping the coarse width: `UPCONV`), concat skip, ConvBlock (3x3 conv, BatchNorm,
  ReLU) with 256, 128, 64 channels, bilinear upsample to H x W, a final ConvBlock and a 1x1 conv
  to 2 logits.
- `PseudoLabelHead`: 1x1 convs 2 d_3 -> 64 -> 32 -> 2 on F_3 (ReLU between), logits upsampled
  bilinearly to H x W.
- `StackedHeads`: n heads of one kind with a leading head axis on every variable, run one after
  another (the default) or as one vmapped computation (`HEAD_BATCHING`).

The 2x2 stride-2 transposed convolution is one matmul and a depth-to-space reshape (`UpConv2x2`),
exactly what the convolution computes, fast forward and backward on CPU and GPU alike: XLA lowers
`lax.conv_transpose` to a convolution with lhs dilation, whose gradients XLA:CPU runs on a slow
generic path, not its matmul/convolution kernels. Vmapped heads' 3x3 convolutions become grouped
convolutions, which XLA:CPU also runs on a slow path; unrolled heads keep plain convolutions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.encoder import resize_bilinear

# The segmentation head's transposed convolution (the paper's Up(.), widths unstated), by name:
# "width": coarse -> the block's width, then concat skip and ConvBlock(width + skip, width), as a
# standard U-Net; "keep": the coarse channels kept through it, ConvBlock(coarse + skip, width)
# (a 2x2 4096 -> 4096 transposed conv at Hiera-Huge; sizes and FLOPs in benchmarks/results/upconv.json).
UPCONV = ("width", "keep")


class ConvBlock(nnx.Module):
    """3x3 conv, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), padding="SAME", use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
        # BatchNorm in fp32 with torch's defaults (momentum 0.1 -> flax 0.9, eps 1e-5).
        self.norm = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                                  dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B,): the examples whose statistics BatchNorm takes in training (None: all); the
        others, padding, are normalized with those statistics and count in none."""
        example_mask = None if mask is None else mask.reshape(-1, *(1,) * (x.ndim - 1))
        return jax.nn.relu(self.norm(self.conv(x), use_running_average=not train, mask=example_mask).astype(x.dtype))


def depth_to_space_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 2x2 stride-2 "VALID" transposed convolution (`lax.conv_transpose`'s numerics, its kernel
    (2, 2, in, out) not flipped: output pixel (2y + a, 2x + b) takes kernel tap (1 - a, 1 - b)) as
    one contraction over the input channels to 4 * out channels, then a depth-to-space reshape.
    The output windows do not overlap, so this is exact, and a matmul forward and backward."""
    batch, height, width, _ = x.shape
    taps = jnp.einsum("nyxc,abco->nyaxbo", x, kernel[::-1, ::-1])
    return taps.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class UpConv2x2(nnx.ConvTranspose):
    """nnx.ConvTranspose(kernel 2x2, stride 2, "VALID") computed by `depth_to_space_2x2`: the same
    variables (kernel (2, 2, in, out), bias), initialization and checkpoint paths."""

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return depth_to_space_2x2(x, kernel) + bias


class SegmentationHead(nnx.Module):
    """U-Net decoder over the interleaved features (eq. 4) -> (B, H, W, 2) logits.

    `upconv`: what the 2x2 stride-2 transposed convolution maps to (see `UPCONV`)."""

    def __init__(self, feature_dims: tuple[int, ...], channels: tuple[int, ...] = (256, 128, 64), *,
                 upconv: str = "width", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(channels) != len(feature_dims) - 1:
            raise ValueError(f"{len(feature_dims)} feature maps need {len(feature_dims) - 1} decoder widths, "
                             f"got {channels}")
        if upconv not in UPCONV:
            raise UserInputError(f"model.upconv {upconv!r}: expected one of {sorted(UPCONV)}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ups, blocks = [], []
        coarse = feature_dims[-1]
        for skip, width in zip(reversed(feature_dims[:-1]), channels):
            up_width = width if upconv == "width" else coarse
            ups.append(UpConv2x2(coarse, up_width, **kw))
            blocks.append(ConvBlock(up_width + skip, width, **kw))
            coarse = width
        self.ups = nnx.List(ups)
        self.blocks = nnx.List(blocks)
        self.final_block = ConvBlock(coarse, coarse, **kw)
        self.classifier = nnx.Conv(coarse, 2, (1, 1), **kw)

    def __call__(self, features: tuple[jax.Array, ...], image_hw: tuple[int, int], train: bool,
                 mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B,): the examples BatchNorm's statistics span (ConvBlock); None: all."""
        x = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(features[:-1])):
            x = block(jnp.concatenate([up(x), skip.astype(x.dtype)], axis=-1), train, mask)
        x = self.final_block(resize_bilinear(x, image_hw), train, mask)
        return self.classifier(x).astype(jnp.float32)


class PseudoLabelHead(nnx.Module):
    """1x1 convs 2 d_3 -> 64 -> 32 -> 2 with ReLU between, on F_3; logits resized to H x W."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (64, 32), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        widths = (in_dim, *hidden, 2)
        self.convs = nnx.List([nnx.Conv(a, b, (1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, feature: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
        x = feature
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index < len(self.convs) - 1:
                x = jax.nn.relu(x)
        return resize_bilinear(x.astype(jnp.float32), image_hw)


# How `StackedHeads` runs its heads: "unrolled", one head after another, each with its own
# convolutions (the default); "vmapped", one vmapped computation, in which every convolution becomes
# a grouped convolution (feature_group_count = heads) and its weight gradient one with
# batch_group_count. XLA:CPU runs those on a slow generic path: the representative train step
# (Hiera-tiny + DINOv2-S, 224 px, 8 images, 2/1 split) took 8.1 s vmapped vs 3.1 s unrolled, and
# compiles no slower unrolled (benchmarks/results/train_step_representative.json).
HEAD_BATCHING = ("unrolled", "vmapped")


class StackedHeads(nnx.Module):
    """`count` heads made by `make(rngs)`, every variable with a leading head axis; a call runs each
    head on its inputs (either per head, axis 0, or shared by all heads), unrolled or vmapped
    (`HEAD_BATCHING`); both compute the same function, and the variables are the same either way."""

    def __init__(self, count: int, make: Callable[[nnx.Rngs], nnx.Module], *, batching: str = "unrolled",
                 rngs: nnx.Rngs):
        if batching not in HEAD_BATCHING:
            raise UserInputError(f"model.head_batching {batching!r}: expected one of {sorted(HEAD_BATCHING)}")
        self.count = count
        self.batching = batching

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=0, out_axes=0)
        def create(head_rngs: nnx.Rngs) -> nnx.Module:
            return make(head_rngs)

        self.heads = create(rngs)

    def __call__(self, inputs, *args, per_head_inputs: bool = True, mask: jax.Array | None = None, **kwargs):
        """Inputs: a pytree whose leaves have a leading head axis (per_head_inputs) or are shared.
        `mask` (given to heads that take one): per example, laid out like the inputs' leading axes."""
        # Raw JAX over the split state (not nnx transforms), so the heads also run inside raw
        # transforms (jax.value_and_grad over a merged state) whatever the variables' trace levels.
        graphdef, state = nnx.split(self.heads)

        def apply(head_state, head_inputs, head_mask):
            head = nnx.merge(graphdef, head_state)
            output = head(head_inputs, *args, **kwargs, **({} if head_mask is None else {"mask": head_mask}))
            return output, nnx.state(head)

        if self.batching == "vmapped":
            input_axis = 0 if per_head_inputs else None
            outputs, new_state = jax.vmap(apply, in_axes=(0, input_axis, input_axis))(state, inputs, mask)
        else:
            # lax.unstack / stack: the gradient of the stacked variables is one stack of the heads'
            # gradients (not a sum of padded slices).
            def heads_of(tree, per_head: bool = True):
                if not per_head:
                    return [tree] * self.count
                leaves, treedef = jax.tree.flatten(tree)
                split = [lax.unstack(leaf) for leaf in leaves]
                return [jax.tree.unflatten(treedef, [parts[i] for parts in split]) for i in range(self.count)]

            results = [apply(*head) for head in zip(heads_of(state), heads_of(inputs, per_head_inputs),
                                                    heads_of(mask, per_head_inputs))]
            outputs, new_state = jax.tree.map(lambda *parts: jnp.stack(parts), *results)
        nnx.update(self.heads, new_state)
        return outputs

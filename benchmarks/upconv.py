"""The paper config's size and cost for each `model.upconv` setting: parameters and XLA FLOPs.

"width" maps the segmentation head's 2x2 stride-2 transposed convolution to the block's width (a
standard U-Net), "keep" keeps the coarse channels through it. Random weights, shapes only:

- parameters of `build_model(config, 11, 1)` (the 11/1 split: 12 segmentation heads), counted on
  `nnx.eval_shape` with the backbones drawn at random (`*_checkpoint = ""`): total, trainable,
  one segmentation head;
- FLOPs per training image of one segmentation head, forward + backward (gradients for its
  parameters and for its input features, which the trainable adapters need; BatchNorm in
  training mode), from XLA's `cost_analysis()` of the compiled program at 224 px. Every row of a
  train step (a source image, or a clean or an augmented target view) passes one segmentation
  head, so this is the per-row share of a train step that the setting changes.

    python benchmarks/upconv.py            # writes benchmarks/results/upconv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SPLIT = (11, 1)  # source, target classes
BATCH = 4  # images in the measured head call (FLOPs are reported per image)


def paper_config(upconv: str):
    from nexvitad_jax.configs import paper

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    config.model.upconv = upconv
    return config


def count(tree) -> int:
    import jax

    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def head_gflops_per_image(head, image_size: int, feature_shapes) -> float:
    """XLA's FLOPs of one head's forward + backward on BATCH images, per image."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(head, nnx.Param, ...)

    def loss(params, rest, features):
        logits = nnx.merge(graphdef, params, rest, copy=True)(features, (image_size, image_size), True)
        return jnp.mean(logits ** 2)

    features = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in feature_shapes)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, rest, features).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis if isinstance(analysis, dict) else analysis[0]
    return float(analysis["flops"]) / BATCH / 1e9


def measure(upconv: str) -> dict:
    from flax import nnx

    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.models.decoder import SegmentationHead
    from nexvitad_jax.models.nexvitad import TRAINABLE

    config = paper_config(upconv)
    model = nnx.eval_shape(lambda: build_model(config, *SPLIT))
    heads = nnx.state(model.source_heads, nnx.Param)
    size = config.data.image_size
    feature_dims = tuple(2 * d for d in model.encoder.stage_dims)
    head = nnx.eval_shape(lambda: SegmentationHead(feature_dims, tuple(config.model.decoder_channels),
                                                   upconv=upconv, rngs=nnx.Rngs(0)))
    shapes = [(BATCH, size // 4 // 2 ** i, size // 4 // 2 ** i, d) for i, d in enumerate(feature_dims)]
    return {"upconv": upconv,
            "parameters": count(nnx.state(model, nnx.Param)),
            "trainable_parameters": count(nnx.state(model, TRAINABLE)),
            "segmentation_head_parameters": count(heads) // model.source_heads.count,
            "first_transposed_conv_parameters": count(nnx.state(head.ups[0], nnx.Param)),
            "head_forward_backward_gflops_per_image": round(head_gflops_per_image(head, size, shapes), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "upconv.json")
    args = parser.parse_args(argv)
    import jax

    from nexvitad_jax.models.decoder import UPCONV

    rows = [measure(upconv) for upconv in UPCONV]
    for row in rows:
        print(json.dumps(row))
    width, keep = (next(row for row in rows if row["upconv"] == name) for name in ("width", "keep"))
    summary = {
        "command": " ".join(["python benchmarks/upconv.py", *(argv if argv is not None else sys.argv[1:])]),
        "what": f"paper config (Hiera-Huge + DINOv2-S, 224 px), split {SPLIT[0]}/{SPLIT[1]}, random weights; "
                "FLOPs: one segmentation head's forward + backward (XLA cost_analysis), per image",
        "jax": jax.__version__, "backend": jax.default_backend(),
        "scale": "the frozen backbones' forward pass per image: 261.7 GFLOPs (hiera-huge 249.462 + "
                 "dinov2-small 12.247, benchmarks/results/backbones.json)",
        "results": rows,
        "keep_over_width": {key: round(keep[key] / width[key], 3) for key in width if key != "upconv"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

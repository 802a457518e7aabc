"""NexViTAD training throughput: the jitted JAX train step vs a PyTorch reference of the same model
written here (transformers Hiera + DINOv2 encoders, a torch decoder with the same heads, losses and
augmentation), eager and torch.compile; same config, same batch sizes, side by side in one process.

Also the opt-in backbone-feature cache (`config.train.feature_cache`): the backbones are frozen,
so their outputs for the images that are never augmented (source images, clean target images, the
pseudo-label passes) are computed once; only the consistency branch's augmented target view still
runs the backbones at each step. Measured side by side: the same phase-2 step with and without
cached features (images/s counts every image a step trains on, both ways), what building the cache
costs per image, and its host memory per image (also projected for the paper's backbones).

    python benchmarks/train_step.py --quick        # tiny config, few rounds (seconds-minutes on CPU)
    python benchmarks/train_step.py                # tiny config, more rounds
    python benchmarks/train_step.py --hiera base --quick --no-torch   # Hiera-B + DINOv2-S at 224, batch 2
    python benchmarks/train_step.py --paper --device   # Hiera-Huge + DINOv2-S at 224 (accelerator)
    python benchmarks/train_step.py --representative   # see below (~25 min on 2 CPU cores)

Representative sizes (`--representative`): Hiera-tiny and Hiera-base, each with DINOv2-S, at 224 px,
the paper's decoder, 8 images a step (a 2/1 split, 2 images per class: 4 source, 2 clean and 2
augmented target images): JAX vs torch eager vs torch.compile, images/s and achieved GFLOP/s, and
where each step's time goes (backbones, heads forward, backward, optimizer); also the JAX step with
the heads run the other way (`model.head_batching`: `jax_heads_vmapped` beside the default
unrolled step), into benchmarks/results/train_step_representative.json. A step's FLOPs (`step_gflops`) are XLA's count
of the step program with the backbones' share replaced by the model-dimension count of
benchmarks/backbones.py (XLA counts a scanned layer once); the PyTorch reference computes the same
model, so one count serves both.

Results: benchmarks/results/train_step.json (or --out), one section per configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SPLIT = (2, 1)  # source, target classes of the CPU configurations


def torch_reference(config, num_source: int, num_target: int):
    """The NexViTAD model in PyTorch: transformers encoders, adapters, projections, interleave,
    U-Net heads (a Python loop over heads, as a torch model would), pseudo-label heads."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    from converters import dinov2 as dinov2_converter, hiera as hiera_converter
    from nexvitad_jax.models import resolve_config

    hiera = hiera_converter.build_torch(resolve_config("hiera", config.model.hiera.to_dict()))
    dino = dinov2_converter.build_torch(resolve_config("dinov2", config.model.dinov2.to_dict()))
    for p in list(hiera.parameters()) + list(dino.parameters()):
        p.requires_grad_(False)
    dims = [int(hiera.config.embed_dim * hiera.config.embed_dim_multiplier ** i) for i in range(4)]
    dino_dim = dino.config.hidden_size

    class Block(nn.Sequential):
        def __init__(self, a, b):
            super().__init__(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

    class SegHead(nn.Module):
        def __init__(self):
            super().__init__()
            feats = [2 * d for d in dims]
            coarse, ups, blocks = feats[-1], [], []
            for skip, width in zip(reversed(feats[:-1]), config.model.decoder_channels):
                # model.upconv (where the config has it): "width" maps to the block's width, "keep"
                # (the earlier default) keeps the coarse width.
                upsampled = width if config.model.get("upconv", "keep") == "width" else coarse
                ups.append(nn.ConvTranspose2d(coarse, upsampled, 2, 2))
                blocks.append(Block(upsampled + skip, width))
                coarse = width
            self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
            self.final, self.cls = Block(coarse, coarse), nn.Conv2d(coarse, 2, 1)

        def forward(self, features, hw):
            x = features[-1]
            for up, block, skip in zip(self.ups, self.blocks, reversed(features[:-1])):
                x = block(torch.cat([up(x), skip], 1))
            return self.cls(self.final(F.interpolate(x, size=hw, mode="bilinear", align_corners=False)))

    class PLHead(nn.Sequential):
        def __init__(self):
            widths = [2 * dims[2], *config.model.pseudo_label_hidden, 2]
            layers = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(a, b, 1), nn.ReLU()]
            super().__init__(*layers[:-1])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.hiera, self.dino = hiera, dino
            self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(d, d // 4), nn.GELU(), nn.Linear(d // 4, d)) for d in dims)
            self.proj = nn.ModuleList(nn.Linear(dino_dim, d) for d in dims)
            self.source_heads = nn.ModuleList(SegHead() for _ in range(num_source))
            self.target_heads = nn.ModuleList(SegHead() for _ in range(num_target))
            self.pl_heads = nn.ModuleList(PLHead() for _ in range(num_target))

        def encode(self, images):
            with torch.no_grad():
                stages = self.hiera(images, output_hidden_states=True).reshaped_hidden_states[1:]
                tokens = self.dino(images).last_hidden_state[:, 1:]
                g = images.shape[-1] // 14
                grid = tokens.reshape(len(images), g, g, -1).permute(0, 3, 1, 2)
            out = []
            for s, ad, pr in zip(stages, self.adapters, self.proj):  # s: (B, h, w, C)
                h = ad(s) + s
                d = pr(F.interpolate(grid, size=s.shape[1:3], mode="bilinear", align_corners=False).permute(0, 2, 3, 1))
                out.append(torch.stack([h, d], -1).flatten(-2).permute(0, 3, 1, 2))
            return out

    return Model()


def torch_step_fn(model, optimizer, num_source, num_target, per_source, per_target, *, device: str = "cpu",
                  autocast: bool = False, train: bool = True):
    """The reference's step on `device`; `autocast`: bf16 autocast of the forward pass; `train=False`:
    the forward pass and loss alone (no backward, no update: the profile's split)."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    bottom_row = torch.tensor([[[0, 0, 1.0]]], device=device)

    def losses(source, masks, target, labels, flips, rots, scales):
        hw = source.shape[-2:]
        # Augmentation as one affine grid per image (flip, rotation, scale), noise, then the inverse.
        angle = rots.float() * (torch.pi / 2)
        sign = torch.where(flips, -1.0, 1.0)
        theta = torch.zeros(len(target), 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * sign / scales, -torch.sin(angle) / scales
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * sign / scales, torch.cos(angle) / scales
        grid = F.affine_grid(theta, list(target.shape), align_corners=True)
        augmented = (F.grid_sample(target, grid, align_corners=True) + 0.05 * torch.randn_like(target)).clamp(0, 1)
        images = torch.cat([source, target, augmented])
        feats = model.encode((images - mean) / std)
        ns, nt = num_source * per_source, num_target * per_target
        loss = 0.0
        for c, head in enumerate(model.source_heads):
            sl = slice(c * per_source, (c + 1) * per_source)
            loss = loss + F.cross_entropy(head([f[sl] for f in feats], hw).float(), masks[sl]) / num_source
        for head in model.pl_heads:
            logits = F.interpolate(head(feats[2][:ns]), size=hw, mode="bilinear", align_corners=False)
            loss = loss + F.cross_entropy(logits.float(), masks) / num_target
        inverse = torch.linalg.inv(torch.cat([theta, bottom_row.expand(len(theta), 1, 3)], 1))[:, :2]
        for c, head in enumerate(model.target_heads):
            clean = slice(ns + c * per_target, ns + (c + 1) * per_target)
            aug = slice(ns + nt + c * per_target, ns + nt + (c + 1) * per_target)
            logits = head([torch.cat([f[clean], f[aug]]) for f in feats], hw).float()
            lab = labels[c * per_target:(c + 1) * per_target]
            loss = loss + F.cross_entropy(logits[:per_target], lab, ignore_index=-1) / num_target
            back = F.grid_sample(logits[per_target:].softmax(1), F.affine_grid(
                inverse[c * per_target:(c + 1) * per_target], list(logits[per_target:].shape), align_corners=True),
                align_corners=True)[:, 1]
            valid = lab != -1
            loss = loss + ((back - lab.float()) ** 2)[valid].mean() / num_target
        return loss

    def step(*batch):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = losses(*batch)
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss

    return step


def timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def cache_bytes_per_image(features) -> int:
    """Host memory of one image's cached backbone outputs (leaves laid out (images, ...))."""
    import jax

    return int(sum(np.prod(f.shape[1:]) * np.dtype(f.dtype).itemsize for f in jax.tree.leaves(features)))


def paper_cache_bytes_per_image(image_size: int = 224) -> int:
    """The same for the paper's backbones (Hiera-Huge + DINOv2-S, float32), from shapes alone."""
    import jax
    from flax import nnx

    from nexvitad_jax.models import build_backbone

    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    total = 0
    for family, variant in (("hiera", "huge"), ("dinov2", "small")):
        module = nnx.eval_shape(lambda: build_backbone(family, variant, rngs=nnx.Rngs(0)))
        outputs = nnx.eval_shape(lambda m, x: m(x), module, image)
        outputs = outputs if family == "hiera" else outputs[0]  # DINOv2: (patch grid, cls token)
        total += sum(int(np.prod(f.shape[1:])) * 4 for f in jax.tree.leaves(outputs))
    return total


# ----------------------------------------------------------------------------------------------
# Batches: per-class arrays, then a step's batch as nexvitad_jax.train.batches lays it out.

def per_class_arrays(config, num_source: int, num_target: int, *, random: bool = True) -> dict[str, np.ndarray]:
    """A phase-2 step's per-class data: images, masks and pseudo-labels (random, or zeros for shapes)."""
    per_source, per_target = int(config.train.source_per_class), int(config.train.target_per_class)
    size = int(config.data.image_size)
    rng = np.random.default_rng(0)
    images = (lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)) if random else (
        lambda shape: np.zeros(shape, np.uint8))
    return {"source_images": images((num_source, per_source, size, size, 3)),
            "source_masks": rng.uniform(size=(num_source, per_source, size, size)) < 0.1,
            "target_images": images((num_target, per_target, size, size, 3)),
            "target_labels": rng.integers(-1, 2, (num_target, per_target, size, size)).astype(np.int32)}


def step_batch(trainer, arrays: dict[str, np.ndarray], phase: int = 2, features=None) -> dict:
    """The host batch of a step of `trainer` from `per_class_arrays`; `features`: (source, target)
    backbone outputs per class instead of the images (a cached trainer)."""
    from nexvitad_jax.train.batches import host_batch

    source_inputs, target_inputs = features or (arrays["source_images"], arrays["target_images"])
    target = (arrays["target_labels"], target_inputs, arrays["target_images"]) if phase == 2 else None
    return host_batch(trainer.layout, phase, trainer.inputs, arrays["source_masks"], source_inputs, target)


def placed_batch(trainer, batch: dict, phase: int = 2) -> dict:
    from nexvitad_jax.train.batches import place_batch
    from nexvitad_jax.train.step import batch_shardings

    return place_batch(batch, batch_shardings(trainer.mesh, phase, trainer.inputs))


# ----------------------------------------------------------------------------------------------
# Shapes only: programs lowered (FLOPs) or compiled (memory) on abstract inputs.

def abstract_trainer(config, num_source: int, num_target: int, *, feature_cache: bool = False):
    """The config's TrainStep on one device built from shapes alone: its model is abstract
    (nnx.eval_shape) and nothing is placed on a device or computed, so `trainer._step[phase].lower(...)`
    gives the program's FLOPs and, compiled, its memory. Images per class: `config.train`."""
    import unittest.mock

    import jax
    from flax import nnx

    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.step import TrainStep, make_optimizer

    model = nnx.eval_shape(lambda: build_model(config, num_source, num_target))
    with unittest.mock.patch("jax.device_put", lambda x, *args, **kwargs: x):  # abstract values stay abstract
        return TrainStep(model, make_optimizer(float(config.train.learning_rate), 10, 1000),
                         make_mesh(jax.devices()[:1]), source_per_class=int(config.train.source_per_class),
                         target_per_class=int(config.train.target_per_class),
                         augmentation=config.train.augmentation.to_dict(), feature_cache=feature_cache)


def abstract_state(trainer) -> dict:
    """The train state of an `abstract_trainer` as shapes (trainable, BatchNorm statistics, Adam, step, rng)."""
    import jax
    import jax.numpy as jnp

    trainable, batch_stats = trainer._initial
    return {"trainable": trainable, "batch_stats": batch_stats,
            "opt_state": jax.eval_shape(trainer.optimizer.init, trainable),
            "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}


def abstract_batch(config, trainer, phase: int = 2, features=None) -> dict:
    """A step's uncached batch (or with `features`, per-class shapes, a cached one) as shapes."""
    import jax

    arrays = per_class_arrays(config, trainer.layout.source_classes, trainer.layout.target_classes, random=False)
    if features is not None:
        features = tuple(jax.tree.map(lambda f: np.zeros(f.shape, f.dtype), part) for part in features)
    batch = step_batch(trainer, arrays, phase, features)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)


def per_class_feature_shapes(trainer, state, images):
    """The backbone outputs' shapes, per class, of images (classes, per_class, H, W, 3)."""
    import jax

    flat = jax.ShapeDtypeStruct((images.shape[0] * images.shape[1], *images.shape[2:]), images.dtype)
    out = jax.eval_shape(trainer._backbone_features_fn, state, trainer.frozen, flat)
    return jax.tree.map(lambda f: jax.ShapeDtypeStruct((*images.shape[:2], *f.shape[1:]), f.dtype), out)


def xla_gflops(fn, *args) -> float:
    """XLA's FLOP count of `fn` lowered on `args` (shapes suffice), in GFLOP. A scanned layer counts
    once: `step_gflops` replaces the backbones' share."""
    import jax

    analysis = jax.jit(fn).lower(*args).cost_analysis()
    return float((analysis if isinstance(analysis, dict) else analysis[0])["flops"]) / 1e9


def backbone_gflops_per_image(config) -> float:
    """Hiera + DINOv2 forward FLOPs per image from the model dimensions (benchmarks/backbones.py)."""
    from benchmarks.backbones import dinov2_flops, hiera_flops
    from nexvitad_jax.models import resolve_config

    size = (int(config.data.image_size),) * 2
    return (hiera_flops(resolve_config("hiera", config.model.hiera.to_dict()), size)
            + dinov2_flops(resolve_config("dinov2", config.model.dinov2.to_dict()), size)) / 1e9


def step_gflops(config, num_source: int, num_target: int, phase: int = 2) -> dict[str, float]:
    """FLOPs of one train step of the config (shapes only): the heads' share (adapters, projections,
    heads, forward and backward, optimizer) as XLA counts it, the backbones' (forward only: frozen)
    from the model dimensions over every row the step runs them on."""
    trainer = abstract_trainer(config, num_source, num_target)
    state = abstract_state(trainer)
    batch = abstract_batch(config, trainer, phase)
    step = xla_gflops(functools.partial(trainer._train_step, phase=phase), state, trainer.frozen, batch)
    backbones_xla = xla_gflops(trainer._backbone_features_fn, state, trainer.frozen, batch["images"])
    rows = batch["images"].shape[0]
    backbones = backbone_gflops_per_image(config) * rows
    return {"total": step - backbones_xla + backbones, "backbones": backbones, "heads": step - backbones_xla,
            "backbone_rows": rows, "xla_count_of_step": step}


def paper_step_gflops(num_source: int = 11, num_target: int = 1, per_class: int = 4) -> dict[str, float]:
    """XLA's FLOP count of the paper config's phase-2 step (Hiera-Huge + DINOv2-S at 224, an 11/1
    split, 4 images per class) with and without the cache, from the lowered programs: shapes only,
    nothing is placed on a device or run. (XLA counts each scanned backbone layer once.)"""
    import jax

    from nexvitad_jax.configs import paper

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    config.train.source_per_class = config.train.target_per_class = per_class
    trainers = {cached: abstract_trainer(config, num_source, num_target, feature_cache=cached)
                for cached in (False, True)}
    trainer = trainers[False]
    state = abstract_state(trainer)
    batch = abstract_batch(config, trainer)
    features = trainer._backbone_features_fn
    arrays = per_class_arrays(config, num_source, num_target, random=False)
    per_class_features = tuple(per_class_feature_shapes(trainer, state, arrays[name])
                               for name in ("source_images", "target_images"))
    cached = abstract_batch(config, trainers[True], 2, per_class_features)
    uncached_gflops = xla_gflops(functools.partial(trainer._train_step, phase=2), state, trainer.frozen, batch)
    cached_gflops = xla_gflops(functools.partial(trainers[True]._train_step, phase=2), state, trainer.frozen, cached)
    one_image = jax.ShapeDtypeStruct((1, *batch["images"].shape[1:]), batch["images"].dtype)
    return {"split": f"{num_source}/{num_target}", "per_class": per_class,
            "images_per_step": (num_source + 2 * num_target) * per_class,
            "uncached": uncached_gflops, "cached": cached_gflops, "ratio": uncached_gflops / cached_gflops,
            "backbones_per_image": xla_gflops(features, state, trainer.frozen, one_image)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper", action="store_true", help="the paper config (random weights) instead of tiny")
    parser.add_argument("--hiera", help="the paper config with this Hiera variant (random weights), e.g. base")
    parser.add_argument("--per-class", type=int, default=2, help="with --hiera: images per class in a step")
    parser.add_argument("--representative", action="store_true",
                        help="Hiera-tiny and Hiera-base + DINOv2-S, 224 px, 8 images a step, with the profile split")
    parser.add_argument("--representative-hiera", default="tiny,base",
                        help="with --representative: the Hiera variants, comma-separated")
    parser.add_argument("--device", action="store_true", help="running on an accelerator: skip nothing, report it")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores for both frameworks (process affinity + torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3 with --quick, else 10)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/train_step.json "
                                                    "(train_step_representative.json with --representative)")
    return parser.parse_args(argv)


def paper_config_with(hiera: str | None = None, per_class: int | None = None, dtype: str | None = None):
    """The paper config with random weights (speed and memory only), optionally another Hiera
    variant, images per class and compute dtype."""
    from nexvitad_jax.configs import paper

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    if hiera:
        config.model.hiera = {"variant": hiera}
    if per_class:
        config.train.source_per_class = config.train.target_per_class = per_class
    if dtype:
        config.model.dtype = dtype
    return config


def benchmark_config(args):
    """(config, section name) of the command line: tiny, the paper's, or the paper's with another Hiera."""
    from nexvitad_jax.configs import tiny

    if args.hiera:
        config = paper_config_with(args.hiera, args.per_class)
        return config, f"hiera-{args.hiera}-{config.data.image_size}-batch{args.per_class}"
    return (paper_config_with(), "paper") if args.paper else (tiny.get_config(), "tiny")


def jax_trainer(config, num_source: int, num_target: int):
    """(TrainStep on every device, holder of its state) of the config's model."""
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.step import TrainStep, make_optimizer

    trainer = TrainStep(build_model(config, num_source, num_target), make_optimizer(1e-4, 10, 1000), make_mesh(),
                        source_per_class=int(config.train.source_per_class),
                        target_per_class=int(config.train.target_per_class),
                        augmentation=config.train.augmentation.to_dict())
    return trainer, {"state": trainer.init_state(0)}


def step_runner(trainer, holder: dict, batch: dict, phase: int = 2):
    """One train step on `batch`, the state carried in `holder`, until its loss is ready."""
    import jax

    def run():
        holder["state"], metrics = trainer(holder["state"], batch, phase)
        jax.block_until_ready(metrics["loss"])
    return run


def jax_profile_parts(trainer, holder: dict, placed: dict) -> dict:
    """Parts of the phase-2 step to time on their own: the backbones on the step's rows, the heads'
    forward pass and loss (backbone outputs given), and that with its backward pass. They read the
    holder's current state (each step donates the one before)."""
    import jax

    losses = functools.partial(trainer._losses, phase=2)
    features = trainer.backbone_features(holder["state"], placed["images"])
    _, transforms = jax.jit(trainer.augmented_view)(placed, jax.random.key(0))
    forward, forward_backward = jax.jit(losses), jax.jit(jax.value_and_grad(losses, has_aux=True))

    def heads(fn):
        state = holder["state"]
        return jax.block_until_ready(fn(state["trainable"], state["batch_stats"], trainer.frozen, features, placed,
                                        transforms))

    parts = {"backbones": lambda: jax.block_until_ready(trainer.backbone_features(holder["state"], placed["images"])),
             "heads_forward": lambda: heads(forward), "heads_forward_backward": lambda: heads(forward_backward)}
    for run in parts.values():  # compile
        run()
    return parts


def feature_cache_candidate(trainer, holder: dict, config, arrays: dict) -> tuple:
    """The same step on cached features (the same model and frozen arrays, already placed: no copy)
    and what the cache costs: its build time and host bytes per image, the cached step's compile time."""
    import jax

    from nexvitad_jax.sharding import row_sharding
    from nexvitad_jax.train.batches import place
    from nexvitad_jax.train.step import TrainStep

    cached_trainer = TrainStep(trainer.model(holder["state"]), trainer.optimizer, trainer.mesh,
                               source_per_class=trainer.layout.per_source, target_per_class=trainer.layout.per_target,
                               augmentation=config.train.augmentation.to_dict(), feature_cache=True)

    def features_of(images):  # (classes, per_class, ...) -> their backbone outputs, per class, on the host
        flat = place(images.reshape(-1, *images.shape[2:]), row_sharding(trainer.mesh))
        out = jax.device_get(trainer.backbone_features(holder["state"], flat))
        return jax.tree.map(lambda f: f.reshape(*images.shape[:2], *f.shape[1:]), out)

    features_of(arrays["source_images"])  # compile
    began = time.perf_counter()
    source_features = features_of(arrays["source_images"])
    measured = {"build_s_per_image": (time.perf_counter() - began) / np.prod(arrays["source_images"].shape[:2]),
                "host_bytes_per_image": cache_bytes_per_image(jax.tree.map(
                    lambda f: f.reshape(-1, *f.shape[2:]), source_features))}
    cached = placed_batch(cached_trainer, step_batch(cached_trainer, arrays, 2, (
        source_features, features_of(arrays["target_images"]))))
    run = step_runner(cached_trainer, holder, cached)
    measured["cached_step_compile_s"] = timed(run, 1)[0]
    return run, measured


def jax_candidates(config, arrays: dict[str, np.ndarray], num_source: int, num_target: int, *,
                   feature_cache: bool = True, profile: bool = False, compare_head_batching: bool = False):
    """The JAX steps to time (uncached; with `feature_cache` the cached step; the backbones alone;
    with `profile` the heads' forward and backward alone; with `compare_head_batching` the step with
    the heads run the other way, `model.head_batching`) and what the setup measured."""
    trainer, holder = jax_trainer(config, num_source, num_target)
    placed = placed_batch(trainer, step_batch(trainer, arrays))
    candidates = {"jax": step_runner(trainer, holder, placed)}
    measured = {"jax_compile_s": timed(candidates["jax"], 1)[0]}
    if feature_cache:
        candidates["jax_feature_cache"], cache_measured = feature_cache_candidate(trainer, holder, config, arrays)
        measured |= cache_measured
    parts = jax_profile_parts(trainer, holder, placed)
    candidates["jax_backbone_forward_only"] = parts.pop("backbones")
    if profile:
        candidates |= {f"jax_{name}": run for name, run in parts.items()}
    if compare_head_batching:  # the same step with the other way of running the heads
        from nexvitad_jax.models.decoder import HEAD_BATCHING

        other = next(b for b in HEAD_BATCHING if b != config.model.head_batching)
        other_config = config.copy_and_resolve_references()
        other_config.model.head_batching = other
        other_trainer, other_holder = jax_trainer(other_config, num_source, num_target)
        name = f"jax_heads_{other}"
        candidates[name] = step_runner(other_trainer, other_holder, placed_batch(other_trainer, step_batch(
            other_trainer, arrays)))
        measured[f"{name}_compile_s"] = timed(candidates[name], 1)[0]
    return candidates, measured


def torch_batch(arrays: dict[str, np.ndarray], device: str) -> tuple:
    """The reference step's arguments: NCHW float images, masks, pseudo-labels and the augmentation's
    draws (flip, rotation, scale per target image)."""
    import torch

    size = arrays["source_images"].shape[2]
    images = lambda name: torch.from_numpy(arrays[name].reshape(-1, size, size, 3)).permute(0, 3, 1, 2).float() / 255
    count = int(np.prod(arrays["target_images"].shape[:2]))
    args = (images("source_images"), torch.from_numpy(arrays["source_masks"].reshape(-1, size, size)).long(),
            images("target_images"), torch.from_numpy(arrays["target_labels"].reshape(-1, size, size)).long(),
            torch.rand(count) < 0.5, torch.randint(0, 4, (count,)), torch.ones(count))
    return tuple(arg.to(device) for arg in args)


def torch_backbones(model, images, device: str, autocast: bool):
    """The reference's frozen backbones alone on the step's images (as its step runs them)."""
    import torch

    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        model.hiera(images, output_hidden_states=True)
        model.dino(images)


def torch_candidates(config, arrays: dict[str, np.ndarray], num_source: int, num_target: int, *,
                     device: str = "cpu", autocast: bool = False, profile: bool = False) -> tuple[dict, dict]:
    """The PyTorch reference's eager step to time (with `profile` also the backbones alone and the
    forward pass alone), warmed up, and the eager step's parts for `torch_compiled`."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs (seconds for Hiera-Huge on a GPU, not a minute)
        model = torch_reference(config, num_source, num_target).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    make = functools.partial(torch_step_fn, model, optimizer, num_source, num_target,
                             int(config.train.source_per_class), int(config.train.target_per_class), device=device,
                             autocast=autocast)
    args = torch_batch(arrays, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls = {"torch_eager": make()}
    if profile:
        calls["torch_heads_forward"] = make(train=False)  # the backbones included: subtracted in the split
        images = torch.cat([args[0], args[2], args[2]])
        calls["torch_backbone_forward_only"] = lambda *_: torch_backbones(model, images, device, autocast)
    candidates = {}
    for name, call in calls.items():
        call(*args)  # warm-up
        candidates[name] = lambda call=call: (call(*args), sync())
    return candidates, {"step": calls["torch_eager"], "args": args, "sync": sync}


def torch_compiled(step: dict) -> tuple:
    """torch.compile of the reference's step (`torch_candidates`' second value): (the step to time
    or None where compilation failed, its compile time, the error)."""
    import torch

    compiled = torch.compile(step["step"])
    began = time.perf_counter()
    try:
        compiled(*step["args"])
    except Exception as error:  # report, do not hide
        print(f"torch.compile failed: {error}", file=sys.stderr)
        return None, time.perf_counter() - began, f"{type(error).__name__}: {error}"[:2000]
    return (lambda: (compiled(*step["args"]), step["sync"]())), time.perf_counter() - began, None


def feature_cache_section(median: dict[str, float], measured: dict[str, float], images_per_step: int,
                          backbone_images_cached: int) -> dict:
    """The result's feature-cache section: the cached step against the uncached one."""
    return {
        "images_per_s": {"uncached": images_per_step / median["jax"],
                         "cached": images_per_step / median["jax_feature_cache"]},
        "speedup": median["jax"] / median["jax_feature_cache"],
        "backbone_images_per_step": {"uncached": images_per_step, "cached": backbone_images_cached},
        "backbone_share_of_uncached_step": median["jax_backbone_forward_only"] / median["jax"],
        "cached_step_compile_s": measured["cached_step_compile_s"],
        "build_s_per_image": measured["build_s_per_image"],
        "host_bytes_per_image": measured["host_bytes_per_image"],
        "paper_host_bytes_per_image": paper_cache_bytes_per_image(),
        "paper_step_gflops_xla_count": paper_step_gflops(),
        "augmentation": "unchanged: only the consistency branch's target view is augmented (fresh "
                        "transforms every step) and it still runs the backbones; source images, clean "
                        "target images and pseudo-label passes are never augmented and come from the cache",
    }


def write_section(out: Path, name: str, result: dict) -> None:
    """The configuration's section of the results file, the other sections kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = json.loads(out.read_text()) if out.is_file() else {}
    if "config" in sections:  # the earlier one-configuration layout
        sections = {}
    sections[name] = result
    out.write_text(json.dumps(sections, indent=2) + "\n")


def profile_split(median: dict[str, float]) -> dict:
    """Where each framework's step time goes (seconds; the parts were timed on their own)."""
    split = {}
    if "jax_heads_forward_backward" in median:
        split["jax"] = {"backbones": median["jax_backbone_forward_only"], "heads_forward": median["jax_heads_forward"],
                        "heads_backward": median["jax_heads_forward_backward"] - median["jax_heads_forward"],
                        "optimizer_augmentation_rest": median["jax"] - median["jax_backbone_forward_only"]
                        - median["jax_heads_forward_backward"], "step": median["jax"]}
    if "torch_heads_forward" in median:
        split["torch_eager"] = {
            "backbones": median["torch_backbone_forward_only"],
            "heads_forward_augmentation": median["torch_heads_forward"] - median["torch_backbone_forward_only"],
            "backward_optimizer": median["torch_eager"] - median["torch_heads_forward"], "step": median["torch_eager"]}
    return split


# Candidates that are whole steps.
STEPS = ("jax", "jax_feature_cache", "jax_heads_unrolled", "jax_heads_vmapped", "torch_eager", "torch_compile")


def measure(config, name: str, *, rounds: int, torch_too: bool, compile_too: bool, feature_cache: bool,
            profile: bool) -> dict:
    """One configuration on this machine's default device: the candidates side by side."""
    import jax

    from benchmarks.backbones import time_side_by_side

    arrays = per_class_arrays(config, *SPLIT)
    images_per_step = SPLIT[0] * int(config.train.source_per_class) + 2 * SPLIT[1] * int(config.train.target_per_class)
    candidates, measured = jax_candidates(config, arrays, *SPLIT, feature_cache=feature_cache, profile=profile,
                                          compare_head_batching=profile)
    compile_info = {key: value for key, value in measured.items()
                    if key == "jax_compile_s" or key.startswith("jax_heads_")}
    if torch_too:
        torch_steps, eager = torch_candidates(config, arrays, *SPLIT, profile=profile)
        candidates |= torch_steps
        if compile_too:
            compiled, compile_info["torch_compile_s"], compile_info["torch_compile_error"] = torch_compiled(eager)
            if compiled:
                candidates["torch_compile"] = compiled
    # Wall and process CPU time, the candidates taking turns every round (on a shared machine the
    # CPU time is the stable figure: benchmarks/backbones.py says why).
    median, cpu_median = time_side_by_side(candidates, rounds)
    gflops = step_gflops(config, *SPLIT)
    result = {"config": name, "image_size": int(config.data.image_size), "hiera": config.model.hiera.to_dict(),
              "head_batching": str(config.model.head_batching),
              "dinov2": config.model.dinov2.to_dict(), "split": f"{SPLIT[0]}/{SPLIT[1]}",
              "images_per_step": images_per_step, "rounds": rounds, "device": str(jax.devices()[0]),
              "platform": platform.platform(), "cpu_cores": len(os.sched_getaffinity(0)),
              "load_average_1min": os.getloadavg()[0], **compile_info, "median_step_s": median,
              "images_per_s": {c: images_per_step / median[c] for c in STEPS if c in median},
              "step_gflops": gflops,
              "achieved_gflop_per_s": {c: gflops["total"] / median[c] for c in STEPS if c in median},
              "median_step_cpu_s": cpu_median}
    for reference in ("torch_eager", "torch_compile", "jax_heads_vmapped", "jax_heads_unrolled"):
        if reference in median:
            result[f"ratio_jax_over_{reference}"] = median[reference] / median["jax"]
            result[f"ratio_jax_over_{reference}_cpu_time"] = cpu_median[reference] / cpu_median["jax"]
    if torch_too:
        import torch

        result["torch_threads"] = torch.get_num_threads()
    if feature_cache:
        result["feature_cache"] = feature_cache_section(median, measured, images_per_step,
                                                        SPLIT[1] * int(config.train.target_per_class))
    if profile:
        result["profile_s"] = profile_split(median)
        result["profile_cpu_s"] = profile_split(cpu_median)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:  # before jax starts its thread pool (it sizes it by the affinity)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
        import torch

        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 10)
    options = dict(torch_too=not args.no_torch, compile_too=not args.no_compile)
    if args.representative:
        out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / "train_step_representative.json")
        for hiera in args.representative_hiera.split(","):
            name = f"hiera-{hiera}+dinov2-small-224-8-images"
            result = measure(paper_config_with(hiera, per_class=2), name, rounds=rounds, feature_cache=False,
                             profile=True, **options)
            result["command"] = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
            write_section(out, name, result)
            print(json.dumps(result, indent=2), flush=True)
        return 0
    config, name = benchmark_config(args)
    result = measure(config, name, rounds=rounds, feature_cache=True, profile=False, **options)
    write_section(Path(args.out or REPO_ROOT / "benchmarks" / "results" / "train_step.json"), name, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

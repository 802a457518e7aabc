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

Results: benchmarks/results/train_step.json (or --out), one section per configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


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
                ups.append(nn.ConvTranspose2d(coarse, coarse, 2, 2))
                blocks.append(Block(coarse + skip, width))
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


def torch_step_fn(model, optimizer, num_source, num_target, per_source, per_target):
    import torch
    import torch.nn.functional as F

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def step(source, masks, target, labels, flips, rots, scales):
        hw = source.shape[-2:]
        # Augmentation as one affine grid per image (flip, rotation, scale), noise, then the inverse.
        angle = rots.float() * (torch.pi / 2)
        sign = torch.where(flips, -1.0, 1.0)
        theta = torch.zeros(len(target), 2, 3)
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
            loss = loss + F.cross_entropy(head([f[sl] for f in feats], hw), masks[sl]) / num_source
        for head in model.pl_heads:
            logits = F.interpolate(head(feats[2][:ns]), size=hw, mode="bilinear", align_corners=False)
            loss = loss + F.cross_entropy(logits, masks) / num_target
        inverse = torch.linalg.inv(torch.cat([theta, torch.tensor([[[0, 0, 1.0]]]).expand(len(theta), 1, 3)], 1))[:, :2]
        for c, head in enumerate(model.target_heads):
            clean = slice(ns + c * per_target, ns + (c + 1) * per_target)
            aug = slice(ns + nt + c * per_target, ns + nt + (c + 1) * per_target)
            logits = head([torch.cat([f[clean], f[aug]]) for f in feats], hw)
            lab = labels[c * per_target:(c + 1) * per_target]
            loss = loss + F.cross_entropy(logits[:per_target], lab, ignore_index=-1) / num_target
            back = F.grid_sample(logits[per_target:].softmax(1), F.affine_grid(
                inverse[c * per_target:(c + 1) * per_target], list(logits[per_target:].shape), align_corners=True),
                align_corners=True)[:, 1]
            valid = lab != -1
            loss = loss + ((back - lab.float()) ** 2)[valid].mean() / num_target
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
    """Host memory of one image's cached backbone outputs (leaves laid out (classes, per_class, ...))."""
    import jax

    return int(sum(np.prod(f.shape[2:]) * np.dtype(f.dtype).itemsize for f in jax.tree.leaves(features)))


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


def paper_step_gflops(num_source: int = 11, num_target: int = 1, per_class: int = 4) -> dict[str, float]:
    """XLA's FLOP count of the paper config's phase-2 step (Hiera-Huge + DINOv2-S at 224, an 11/1
    split, 4 images per class) with and without the cache, from the lowered programs: shapes only,
    nothing is placed on a device or run."""
    import unittest.mock

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nexvitad_jax.configs import paper
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.step import TrainStep, make_optimizer

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""
    model = nnx.eval_shape(lambda: build_model(config, num_source, num_target))
    with unittest.mock.patch("jax.device_put", lambda x, *args, **kwargs: x):  # abstract values stay abstract
        trainers = {cached: TrainStep(model, make_optimizer(1e-4, 10, 1000), make_mesh(jax.devices()[:1]),
                                      feature_cache=cached) for cached in (False, True)}
    trainer = trainers[False]
    trainable, batch_stats = trainer._initial
    state = {"trainable": trainable, "batch_stats": batch_stats,
             "opt_state": jax.eval_shape(trainer.optimizer.init, trainable),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    size = int(config.data.image_size)

    def images(classes):
        return jax.ShapeDtypeStruct((classes, per_class, size, size, 3), jnp.uint8)

    batch = {"source_images": images(num_source),
             "source_masks": jax.ShapeDtypeStruct((num_source, per_class, size, size), jnp.bool_),
             "target_images": images(num_target),
             "target_labels": jax.ShapeDtypeStruct((num_target, per_class, size, size), jnp.int32)}
    features = trainer._backbone_features_fn
    cached = {key: value for key, value in batch.items() if key != "source_images"}
    cached["source_features"] = jax.eval_shape(features, state, trainer.frozen, batch["source_images"])
    cached["target_features"] = jax.eval_shape(features, state, trainer.frozen, batch["target_images"])

    def gflops(fn, *args) -> float:
        analysis = jax.jit(fn).lower(*args).cost_analysis()
        return float((analysis if isinstance(analysis, dict) else analysis[0])["flops"]) / 1e9

    uncached_gflops = gflops(functools.partial(trainer._train_step, phase=2), state, trainer.frozen, batch)
    cached_gflops = gflops(functools.partial(trainers[True]._train_step, phase=2), state, trainer.frozen, cached)
    return {"split": f"{num_source}/{num_target}", "per_class": per_class,
            "images_per_step": (num_source + 2 * num_target) * per_class,
            "uncached": uncached_gflops, "cached": cached_gflops, "ratio": uncached_gflops / cached_gflops,
            "backbones_per_image": gflops(features, state, trainer.frozen, images(1)) / per_class}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper", action="store_true", help="the paper config (random weights) instead of tiny")
    parser.add_argument("--hiera", help="the paper config with this Hiera variant (random weights), e.g. base")
    parser.add_argument("--per-class", type=int, default=2, help="with --hiera: images per class in a step")
    parser.add_argument("--device", action="store_true", help="running on an accelerator: skip nothing, report it")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "train_step.json"))
    return parser.parse_args(argv)


def benchmark_config(args):
    """(config, section name) of the command line: tiny, the paper's, or the paper's with another Hiera."""
    from nexvitad_jax.configs import paper, tiny

    config = (paper if args.paper or args.hiera else tiny).get_config()
    name = "tiny"
    if args.paper or args.hiera:
        config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""  # random weights: speed only
        name = "paper"
    if args.hiera:
        config.model.hiera = {"variant": args.hiera}
        config.train.source_per_class = config.train.target_per_class = args.per_class
        name = f"hiera-{args.hiera}-{config.data.image_size}-batch{args.per_class}"
    return config, name


def random_batch(config, num_source: int, num_target: int) -> dict[str, np.ndarray]:
    """An uncached phase-2 batch of random images, masks and pseudo-labels."""
    per_source, per_target = int(config.train.source_per_class), int(config.train.target_per_class)
    size = int(config.data.image_size)
    rng = np.random.default_rng(0)
    return {"source_images": rng.integers(0, 256, (num_source, per_source, size, size, 3), dtype=np.uint8),
            "source_masks": rng.uniform(size=(num_source, per_source, size, size)) < 0.1,
            "target_images": rng.integers(0, 256, (num_target, per_target, size, size, 3), dtype=np.uint8),
            "target_labels": rng.integers(-1, 2, (num_target, per_target, size, size)).astype(np.int32)}


def jax_candidates(config, batch: dict[str, np.ndarray], num_source: int, num_target: int):
    """The JAX steps to time (uncached, cached, the backbones alone) and what the setup measured:
    compile times and the feature cache's build time and size per image."""
    import jax
    from flax import nnx

    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import batch_sharding, make_mesh
    from nexvitad_jax.train.step import TrainStep, features_from_images, make_optimizer

    mesh = make_mesh()
    trainer = TrainStep(build_model(config, num_source, num_target), make_optimizer(1e-4, 10, 1000), mesh)
    holder = {"state": trainer.init_state(0)}
    # The same model and frozen arrays (already placed: no copy), taking cached features.
    cached_trainer = TrainStep(trainer.model(holder["state"]), trainer.optimizer, mesh, feature_cache=True)
    placed = jax.device_put(batch, batch_sharding(mesh))
    measured = {}

    def step(step_of, step_batch):
        def run():
            holder["state"], metrics = step_of(holder["state"], step_batch, 2)
            jax.block_until_ready(metrics["loss"])
        return run

    measured["jax_compile_s"] = timed(step(trainer, placed), 1)[0]
    # The feature cache: what building it costs per image (after its compilation), then the same
    # step on cached source and clean-target features.
    jax.block_until_ready(trainer.backbone_features(holder["state"], placed["source_images"]))
    began = time.perf_counter()
    source_features = jax.block_until_ready(trainer.backbone_features(holder["state"], placed["source_images"]))
    measured["build_s_per_image"] = (time.perf_counter() - began) / (num_source * batch["source_images"].shape[1])
    measured["host_bytes_per_image"] = cache_bytes_per_image(source_features)
    cached = {key: value for key, value in placed.items() if key != "source_images"}
    cached["source_features"] = source_features
    cached["target_features"] = trainer.backbone_features(holder["state"], placed["target_images"])
    measured["cached_step_compile_s"] = timed(step(cached_trainer, cached), 1)[0]

    # Backbone share of the step (an upper bound on what any feature cache can save).
    augmented, _ = jax.jit(trainer.augmented_view)(placed, jax.random.key(0))
    backbone = jax.jit(lambda state, frozen, images, view: features_from_images(
        nnx.merge(trainer.graphdef, state["trainable"], state["batch_stats"], frozen), images, ("source", "target"),
        view))

    def backbone_only():
        jax.block_until_ready(backbone(holder["state"], trainer.frozen, placed, augmented))

    backbone_only()
    candidates = {"jax": step(trainer, placed), "jax_feature_cache": step(cached_trainer, cached),
                  "jax_backbone_forward_only": backbone_only}
    return candidates, measured


def torch_candidates(config, batch: dict[str, np.ndarray], num_source: int, num_target: int, compile_too: bool):
    """The PyTorch reference's steps to time (eager, torch.compile) and torch.compile's compile time."""
    import torch

    per_source, per_target = int(config.train.source_per_class), int(config.train.target_per_class)
    size = int(config.data.image_size)
    torch.manual_seed(0)
    torch_model = torch_reference(config, num_source, num_target).train()
    optimizer = torch.optim.Adam([p for p in torch_model.parameters() if p.requires_grad], lr=1e-4)
    step = torch_step_fn(torch_model, optimizer, num_source, num_target, per_source, per_target)
    t_args = (torch.from_numpy(batch["source_images"].reshape(-1, size, size, 3)).permute(0, 3, 1, 2).float() / 255,
              torch.from_numpy(batch["source_masks"].reshape(-1, size, size)).long(),
              torch.from_numpy(batch["target_images"].reshape(-1, size, size, 3)).permute(0, 3, 1, 2).float() / 255,
              torch.from_numpy(batch["target_labels"].reshape(-1, size, size)).long(),
              torch.rand(num_target * per_target) < 0.5, torch.randint(0, 4, (num_target * per_target,)),
              torch.ones(num_target * per_target))
    step(*t_args)  # warm-up
    candidates = {"torch_eager": lambda: step(*t_args)}
    torch_compile_s = None
    if compile_too:
        compiled = torch.compile(step)
        began = time.perf_counter()
        try:
            compiled(*t_args)
            candidates["torch_compile"] = lambda: compiled(*t_args)
        except Exception as error:  # report, do not hide
            print(f"torch.compile failed: {error}", file=sys.stderr)
        torch_compile_s = time.perf_counter() - began
    return candidates, torch_compile_s


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


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    config, name = benchmark_config(args)
    num_source, num_target = 2, 1
    per_target = int(config.train.target_per_class)
    images_per_step = num_source * int(config.train.source_per_class) + 2 * num_target * per_target
    rounds = 3 if args.quick else 10
    batch = random_batch(config, num_source, num_target)
    candidates, measured = jax_candidates(config, batch, num_source, num_target)
    torch_compile_s = None
    if not args.no_torch:
        torch_steps, torch_compile_s = torch_candidates(config, batch, num_source, num_target, not args.no_compile)
        candidates |= torch_steps
    times = {candidate: [] for candidate in candidates}
    for _ in range(rounds):  # alternate candidates each round
        for candidate, fn in candidates.items():
            times[candidate] += timed(fn, 1)
    median = {candidate: statistics.median(t) for candidate, t in times.items()}

    result = {
        "config": name, "image_size": int(config.data.image_size), "hiera": config.model.hiera.to_dict(),
        "dinov2": config.model.dinov2.to_dict(), "images_per_step": images_per_step, "rounds": rounds,
        "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0], "jax_compile_s": measured["jax_compile_s"], "median_step_s": median,
        "images_per_s": {candidate: images_per_step / t for candidate, t in median.items()
                         if candidate != "jax_backbone_forward_only"},
        "feature_cache": feature_cache_section(median, measured, images_per_step, num_target * per_target),
    }
    if not args.no_torch:
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["ratio_jax_over_torch_eager"] = median["torch_eager"] / median["jax"]
        if "torch_compile" in median:
            result["ratio_jax_over_torch_compile"] = median["torch_compile"] / median["jax"]
            result["torch_compile_s"] = torch_compile_s
    write_section(Path(args.out), name, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""NexViTAD training throughput: the jitted JAX train step vs a PyTorch reference of the same model
written here (transformers Hiera + DINOv2 encoders, a torch decoder with the same heads, losses and
augmentation), eager and torch.compile; same config, same batch sizes, side by side in one process.
Also measures the opt-in backbone-feature cache: the backbones are frozen, so their outputs for the
un-augmented images could be computed once; the step time without the backbone forward is what a
cache saves. It cannot cover the augmented target view (random flip/rotation/scale/noise change the
backbone input every step), so with a cache the consistency term (eq. 7) needs either the backbone
on the augmented images each step or a fixed, precomputed set of augmentations.

    python benchmarks/train_step.py --quick        # tiny config, few rounds (seconds-minutes on CPU)
    python benchmarks/train_step.py                # tiny config, more rounds
    python benchmarks/train_step.py --paper --device   # Hiera-Huge + DINOv2-S at 224 (accelerator)

Results: benchmarks/results/train_step.json (or --out).
"""

from __future__ import annotations

import argparse
import json
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

    hiera = hiera_converter.build_torch(resolve_config("hiera", config.hiera.to_dict() if hasattr(config.hiera, "to_dict") else config.hiera))
    dino = dinov2_converter.build_torch(resolve_config("dinov2", config.dinov2.to_dict() if hasattr(config.dinov2, "to_dict") else config.dinov2))
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
            for skip, width in zip(reversed(feats[:-1]), config.decoder_channels):
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
            widths = [2 * dims[2], *config.pseudo_label_hidden, 2]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper", action="store_true", help="the paper config (random weights) instead of tiny")
    parser.add_argument("--device", action="store_true", help="running on an accelerator: skip nothing, report it")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args(argv)

    import jax
    import torch

    from experiments.configs import paper, tiny
    from nexvitad_jax.train.loop import build_model
    from nexvitad_jax.train.step import TrainStep, batch_sharding, make_mesh, make_optimizer

    config = (paper if args.paper else tiny).get_config()
    if args.paper:
        config.hiera_checkpoint = config.dinov2_checkpoint = ""  # random weights: speed only
    num_source, num_target = 2, 1
    per_source, per_target = int(config.source_per_class), int(config.target_per_class)
    size = int(config.image_size)
    rounds = 3 if args.quick else 10
    rng = np.random.default_rng(0)
    batch = {"source_images": rng.integers(0, 256, (num_source, per_source, size, size, 3), dtype=np.uint8),
             "source_masks": rng.uniform(size=(num_source, per_source, size, size)) < 0.1,
             "target_images": rng.integers(0, 256, (num_target, per_target, size, size, 3), dtype=np.uint8),
             "target_labels": rng.integers(-1, 2, (num_target, per_target, size, size)).astype(np.int32)}
    images_per_step = num_source * per_source + 2 * num_target * per_target

    mesh = make_mesh()
    trainer = TrainStep(build_model(config, num_source, num_target), make_optimizer(1e-4, 10, 1000), mesh)
    state = trainer.init_state(0)
    placed = jax.device_put(batch, batch_sharding(mesh))
    compile_began = time.perf_counter()
    state, metrics = trainer(state, placed, 2)
    jax.block_until_ready(metrics["loss"])
    jax_compile_s = time.perf_counter() - compile_began
    holder = {"state": state}

    def jax_step():
        holder["state"], m = trainer(holder["state"], placed, 2)
        jax.block_until_ready(m["loss"])

    # Backbone share of the step (what a feature cache would save).
    images, _ = jax.jit(lambda b, r: trainer._step_images(b, r, 2))(placed, jax.random.key(0))
    backbone = jax.jit(lambda s, f, x: nnx_model_backbone(trainer, s, f, x))

    def backbone_only():
        jax.block_until_ready(backbone(holder["state"], trainer.frozen, images))

    backbone_only()

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
    candidates = {"jax": jax_step, "jax_backbone_forward_only": backbone_only, "torch_eager": lambda: step(*t_args)}
    if not args.no_compile:
        compiled = torch.compile(step)
        began = time.perf_counter()
        try:
            compiled(*t_args)
            candidates["torch_compile"] = lambda: compiled(*t_args)
        except Exception as error:  # report, do not hide
            print(f"torch.compile failed: {error}", file=sys.stderr)
        torch_compile_s = time.perf_counter() - began
    times = {name: [] for name in candidates}
    for _ in range(rounds):  # alternate frameworks each round
        for name, fn in candidates.items():
            times[name] += timed(fn, 1)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": "paper" if args.paper else "tiny", "image_size": size, "images_per_step": images_per_step,
        "rounds": rounds, "device": str(jax.devices()[0]), "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(), "jax_compile_s": jax_compile_s,
        "median_step_s": median,
        "images_per_s": {name: images_per_step / t for name, t in median.items() if name != "jax_backbone_forward_only"},
        "ratio_jax_over_torch_eager": median["torch_eager"] / median["jax"],
        "feature_cache": {
            "backbone_share_of_step": median["jax_backbone_forward_only"] / median["jax"],
            "note": "a cache of the frozen backbones' outputs removes at most this share; the augmented "
                    "target view still needs the backbone each step (or a fixed precomputed augmentation set)"},
    }
    if "torch_compile" in median:
        result["ratio_jax_over_torch_compile"] = median["torch_compile"] / median["jax"]
        result["torch_compile_s"] = torch_compile_s
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def nnx_model_backbone(trainer, state, frozen, images):
    from flax import nnx

    from nexvitad_jax.models.nexvitad import normalize

    model = nnx.merge(trainer.graphdef, state["trainable"], state["batch_stats"], frozen)
    return model.encoder.backbone_features(normalize(images))


if __name__ == "__main__":
    raise SystemExit(main())

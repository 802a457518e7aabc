"""Every GPU measurement the project owes, in one time-boxed run (under 7 minutes on one H100/H200).

    python benchmarks/device_check.py --out DIR              # on the GPU machine (BUILD.md: the command)
    python benchmarks/device_check.py --smoke --out DIR      # every section at tiny sizes on CPU (< 3 min)
    python benchmarks/device_check.py --out DIR --sections e2e_paper --deadline e2e_paper=300   # one again

Each section runs in a process of its own under a deadline: over it, the process is killed and the
section recorded as "cut" with what it had written so far. A section writes DIR/SECTION.json as it
goes (status "running", then "ok", "skipped" with its reason, or "failed" with the error) and its
output to DIR/logs/SECTION.log; after each section DIR/device_check.json (every section) and
DIR/summary.md (one line each) are rewritten. Sections, in order (the last three side by side):
- environment: jax, CUDA, device kind and memory, torch and transformers, the installed packages;
- parity: Hiera-Huge and DINOv2-S (random weights, full size) against transformers on the same
  device, fp32 (default and highest matmul precision) and bf16;
- kmeans: `sweep_k` for K = 8..4096 at N = 10^6, D = 1024 (goal < 60 s);
- latency: the paper's Fig. 9, batch 1 and 15, K = 30, Hiera-Huge + DINOv2-S (`experiments.inference_time`;
  paper: 105 ms on an A100; goal <= 15 ms);
- backbones: forward images/s at batch 64 and 256 in bf16, JAX vs torch eager vs torch.compile, MFU
  against the bf16 matmul peak measured here (`benchmarks.backbones.bench_model`; goals >= 1.3x
  torch.compile, >= 40 % MFU for Hiera-Huge + DINOv2-S);
- train_step_jax, train_step_torch: the paper config's phase-2 step (random weights, 11/1, 4 images
  per class: 52 images) in fp32 and bf16, images/s and MFU, the step's GPU memory and longest
  kernels, JAX vs the PyTorch reference of benchmarks/train_step.py eager and compiled (goals >= 1.5x
  eager, >= 1.0x compiled); the two frameworks in separate processes, so each has the whole device;
- weights: pretrained Hiera / DINOv2 weights on this machine's disk (the HF and torch hub caches,
  a `find /` under a time limit), each converted with `python -m converters ... --verify`;
- e2e_default, e2e_paper: `nexvitad run` with no arguments, and the paper config with random
  full-size backbones on the synthetic set at 224 px for a few steps, end to end.
--smoke runs each at tiny sizes on the CPU (tests/test_device_check.py): the machinery, not the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GOALS = {"kmeans_sweep_s": 60.0, "latency_ms": 15.0, "backbones_over_torch_compile": 1.3, "backbones_mfu": 0.4,
         "train_over_torch_eager": 1.5, "train_over_torch_compile": 1.0}


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


# ----------------------------------------------------------------------------------------------
# The sections' context: sizes of the mode, the device, and recording as results come in.

@dataclasses.dataclass
class Context:
    name: str
    out: Path
    smoke: bool
    result: dict = dataclasses.field(default_factory=dict)

    def require_gpu(self) -> None:
        """Sections measure a GPU; without one only --smoke runs them (on the CPU, at tiny sizes)."""
        import jax

        if not self.smoke and jax.default_backend() != "gpu":
            raise Skipped(f"no GPU: jax's backend is {jax.default_backend()} (--smoke runs the CPU-sized check)")

    def record(self, **fields) -> None:
        """Add results and rewrite DIR/SECTION.json (a cut section keeps what was recorded)."""
        self.result.update(fields)
        write_json(self.out / f"{self.name}.json", self.result)

    def workdir(self, name: str) -> Path:
        """A scratch folder outside DIR (DIR may be a device's $OUT, which returns few files)."""
        return Path(tempfile.mkdtemp(prefix=f"device_check_{self.name}_{name}_"))


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    temporary.replace(path)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `fn`, which blocks until its work is done (warmed up once more first)."""
    from benchmarks.kmeans import median_time as median_after_warmup

    return median_after_warmup(fn, repeats)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    return float(np.max(np.abs(ours - reference)) / max(float(np.max(np.abs(reference))), 1e-30))


# ----------------------------------------------------------------------------------------------
# environment

def package_versions(names) -> dict[str, str | None]:
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax",
            "orbax-checkpoint", "ott-jax", "ml_collections", "lineax", "equinox", "jaxopt", "numpy", "scipy",
            "pillow", "matplotlib", "tqdm", "torch", "transformers", "safetensors", "nexvitad-jax")


def section_environment(ctx: Context) -> None:
    import jax

    device = jax.devices()[0]
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "memory_stats": device.memory_stats(), "packages": package_versions(PACKAGES),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_", "TF_"))}}
    ctx.record(**info)
    try:
        info["jax_environment"] = jax.print_environment_info(return_string=True)
    except Exception as error:  # jax's report shells out to nvidia-smi; keep what the rest gave
        info["jax_environment"] = f"unavailable: {error}"
    import torch

    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                     "cuda_available": torch.cuda.is_available(),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    memory = info["memory_stats"] or {}
    headline = f"{info['device_kind']} x{info['device_count']}, jax {jax.__version__}, torch {torch.__version__}"
    if memory.get("bytes_limit"):
        headline += f", {memory['bytes_limit'] / 2 ** 30:.0f} GiB for XLA"
    ctx.record(**info, headline=headline)


# ----------------------------------------------------------------------------------------------
# weights: pretrained backbones on this machine's disk

CHECKPOINT_NAMES = ("*.safetensors", "*.pth", "*.pt", "*.bin")
HF_FAMILIES = {"hiera": "hiera", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}


def find_checkpoints(roots: list[Path], min_bytes: int, seconds: float) -> tuple[list[str], bool]:
    """Files named like checkpoints, at least `min_bytes` (links too: the HF hub cache links its
    snapshots to blobs), under `roots` (`find`, stopped after `seconds`); and whether it finished."""
    names = sum([["-name", pattern, "-o"] for pattern in CHECKPOINT_NAMES], [])[:-1]
    prune = ["(", "-path", "/proc", "-o", "-path", "/sys", "-o", "-path", "/dev", ")", "-prune", "-o"]
    size = ["(", "-type", "l", "-o", "-type", "f", "-size", f"+{max(min_bytes // 1024 - 1, 0)}k", ")"]
    command = ["find", *map(str, roots), *prune, "(", *names, ")", *size, "-print"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
        found, finished = done.stdout, True
    except subprocess.TimeoutExpired as timeout:  # what it printed so far (bytes, whatever `text` says)
        found, finished = (timeout.stdout or b"").decode(errors="replace"), False
    paths = sorted(set(found.split("\n")) - {""})
    return [path for path in paths if _size(path) >= min_bytes], finished


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size  # through a link to its target
    except OSError:
        return -1


def checkpoint_family(path: Path) -> tuple[str, str] | None:
    """(family, converter source) of a checkpoint file: an HF folder by its config.json's
    model_type, an official .pth by its name; None for anything else."""
    config = path.parent / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type", "")
        except (OSError, ValueError):
            model_type = ""
        if model_type in HF_FAMILIES:
            return HF_FAMILIES[model_type], str(path.parent)
    lowered = path.name.lower()
    for family in ("hiera", "dinov2"):
        if family in lowered and path.suffix in (".pth", ".pt"):
            return family, str(path)
    return None


def convert_found(family: str, source: str, seconds: float) -> dict:
    """`python -m converters FAMILY --source SOURCE --verify` into a scratch folder; its parity line."""
    out = Path(tempfile.mkdtemp(prefix="device_check_weights_"))
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "converters", family, "--source", source, "--out", str(out),
                               "--verify"], capture_output=True, text=True, timeout=seconds, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"family": family, "source": source, "status": f"cut after {seconds:.0f} s"}
    verify = re.findall(r"verify: .*", done.stdout + done.stderr)
    return {"family": family, "source": source, "returncode": done.returncode,
            "seconds": round(time.perf_counter() - began, 1), "verify": verify[-1] if verify else None,
            "output_tail": (done.stdout + done.stderr)[-1500:] if done.returncode else None}


def plant_tiny_checkpoint(root: Path) -> None:
    """--smoke: a tiny random transformers DINOv2 saved as an HF folder, for the search to find."""
    import transformers

    model = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64,
                                                               image_size=56))
    model.save_pretrained(root / "planted-dinov2-tiny")


def section_weights(ctx: Context) -> None:
    home = Path.home()
    caches = [Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface")), Path(os.environ.get(
        "TORCH_HOME", home / ".cache" / "torch")), home / ".cache" / "huggingface", home / ".cache" / "torch"]
    roots = sorted({c for c in caches if c.is_dir()})
    if ctx.smoke:
        planted = Path(tempfile.mkdtemp(prefix="device_check_planted_"))
        plant_tiny_checkpoint(planted)
        roots, min_bytes, seconds = roots + [planted], 1, 20.0
    else:
        roots, min_bytes, seconds = [Path("/")], 20 << 20, 30.0
    found, finished = find_checkpoints(roots, min_bytes, seconds)
    ctx.record(roots=[str(r) for r in roots], min_bytes=min_bytes, search_finished=finished,
               files_found=found[:100], files_found_count=len(found))
    candidates = sorted({family for family in map(checkpoint_family, map(Path, found)) if family})
    ctx.record(backbones_found=[{"family": f, "source": s} for f, s in candidates])
    conversions = []
    for family, source in candidates[:4]:
        conversions.append(convert_found(family, source, 60.0))
        ctx.record(conversions=conversions)
    ctx.record(conversions=conversions, headline=(
        f"{len(found)} checkpoint-like files, {len(candidates)} Hiera/DINOv2 "
        + ("" if finished else "(search cut) ") + "; ".join(c.get("verify") or c.get("status", "failed")
                                                           for c in conversions)).strip())


# ----------------------------------------------------------------------------------------------
# parity: the ports against transformers on the same device

def perturbed_torch_model(family: str, config, device: str):
    """transformers' model of `config` built on `device` (fast init of full sizes), every parameter
    perturbed so constant initializations cannot hide a swapped tensor."""
    import torch

    from converters.common import converter_for

    torch.manual_seed(0)
    with torch.device(device):
        model = converter_for(family).build_torch(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_((1.0 if "position_embeddings" in name else 0.02) * torch.randn_like(param))
    return model.eval()


def torch_outputs_on(model, family: str, images: np.ndarray, device: str, dtype) -> list[np.ndarray]:
    """The outputs the converters compare (Hiera: 4 stage maps; DINOv2: patch grid, cls) from a
    forward on `device` in `dtype` (benchmarks.backbones.torch_call)."""
    import torch

    from benchmarks.backbones import torch_call

    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device=device, dtype=dtype)
    outputs = torch_call(model, family)(pixels)
    if family == "hiera":
        return [o.float().cpu().numpy() for o in outputs[1:]]
    config = model.config
    registers = getattr(config, "num_register_tokens", 0) if config.model_type == "dinov2_with_registers" else 0
    sequence = outputs.float().cpu().numpy()
    grid = (images.shape[1] // config.patch_size, images.shape[2] // config.patch_size)
    return [sequence[:, 1 + registers:].reshape(len(images), *grid, -1), sequence[:, 0]]


def jax_outputs(family: str, config, params, images: np.ndarray, dtype, precision: str | None) -> list[np.ndarray]:
    import jax

    from converters.common import converter_for
    from nexvitad_jax.models import instantiate_backbone

    module = instantiate_backbone(family, config, params, dtype=dtype)
    with jax.default_matmul_precision(precision):
        outputs = converter_for(family).flax_outputs(module, images)
    return outputs[:4] if family == "hiera" else outputs  # Hiera: the stage maps (not the pooled vector)


def parity_row(family: str, config, device: str, batch: int, size: int) -> dict:
    """Max relative errors per output of every pairing of the two frameworks in fp32 and bf16."""
    import jax.numpy as jnp
    import torch

    from converters.common import converter_for

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is fp32
    model = perturbed_torch_model(family, config, device)
    params = converter_for(family).convert({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()},
                                           config, "hf")
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    torch32 = torch_outputs_on(model, family, images, device, torch.float32)
    torch16 = torch_outputs_on(model.to(torch.bfloat16), family, images, device, torch.bfloat16)
    del model
    ours = {"jax_fp32_highest": jax_outputs(family, config, params, images, jnp.float32, "highest"),
            "jax_fp32_default": jax_outputs(family, config, params, images, jnp.float32, None),
            "jax_bf16": jax_outputs(family, config, params, images, jnp.bfloat16, None)}
    errors = {f"{name}_vs_torch_fp32": [relative_error(o, r) for o, r in zip(outputs, torch32)]
              for name, outputs in ours.items()}
    errors["torch_bf16_vs_torch_fp32"] = [relative_error(o, r) for o, r in zip(torch16, torch32)]
    errors["jax_bf16_vs_torch_bf16"] = [relative_error(o, r) for o, r in zip(ours["jax_bf16"], torch16)]
    return {"family": family, "batch": batch, "image_size": size, "max_relative_error": errors,
            "fp32_within_1e-5": max(errors["jax_fp32_highest_vs_torch_fp32"]) <= 1e-5}


def section_parity(ctx: Context) -> None:
    from nexvitad_jax.models import resolve_config

    ctx.require_gpu()
    if ctx.smoke:
        models = {"hiera": {"embed_dim": 8, "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1]},
                  "dinov2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}}
        device = "cpu"
    else:
        models, device = {"hiera": {"variant": "huge"}, "dinov2": {"variant": "small"}}, "cuda"
    rows = []
    for family, spec in models.items():
        rows.append({"spec": spec, **parity_row(family, resolve_config(family, spec), device, 2, 224)})
        ctx.record(rows=rows)
    worst = {row["family"]: {pairing: f"{max(errors):.1e}" for pairing, errors in row["max_relative_error"].items()
                             if pairing in ("jax_fp32_highest_vs_torch_fp32", "jax_bf16_vs_torch_fp32")}
             for row in rows}
    ctx.record(rows=rows, headline=f"max relative error {worst}")


# ----------------------------------------------------------------------------------------------
# kmeans: the cluster-count sweep at N = 10^6

def section_kmeans(ctx: Context) -> None:
    import jax

    from benchmarks.kmeans import block
    from nexvitad_jax.inference import SolverOptions, sweep_k

    ctx.require_gpu()
    n, d, top, iterations = (4096, 32, 6, 3) if ctx.smoke else (1_000_000, 1024, 12, 20)
    ks = [2 ** p for p in range(3, top + 1)]
    x = block(jax.random.normal(jax.random.key(0), (n, d)))
    run = lambda max_iters: block(sweep_k(x, ks, rng=jax.random.key(1), max_iters=max_iters, tol=0.0,
                                          options=SolverOptions()))
    ctx.record(n=n, d=d, ks=ks, iterations=iterations, tol=0.0, options=dataclasses.asdict(SolverOptions()))
    began = time.perf_counter()
    run(1)  # compiles the measured program (max_iters is traced), k-means++ and one iteration
    ctx.record(compile_and_first_iteration_s=time.perf_counter() - began)
    began = time.perf_counter()
    result = run(iterations)
    seconds = time.perf_counter() - began
    per_k = {str(k): {"newton_passes": int(result.result.newton_steps[i]),
                      "sinkhorn_iterations": int(result.result.sinkhorn_iterations[i]),
                      "sinkhorn_converged": bool(result.result.sinkhorn_converged[i]),
                      "objective": float(result.objective[i])} for i, k in enumerate(ks)}
    ctx.record(sweep_s=seconds, goal_s=GOALS["kmeans_sweep_s"], goal_met=seconds < GOALS["kmeans_sweep_s"],
               per_k=per_k, headline=f"K = {ks[0]}..{ks[-1]} at N = {n}, D = {d}, {iterations} iterations: "
                                     f"{seconds:.1f} s (goal < {GOALS['kmeans_sweep_s']:.0f} s)")


# ----------------------------------------------------------------------------------------------
# latency: the paper's Fig. 9

def section_latency(ctx: Context) -> None:
    from experiments.inference_time import execute
    from nexvitad_jax.config import load_config

    ctx.require_gpu()
    if ctx.smoke:
        variants, batches, warmup, repeats = {"float32": load_config("tiny")}, (2,), 1, 2
    else:
        variants = {dtype: load_config("paper", ['model.hiera_checkpoint=""', 'model.dinov2_checkpoint=""',
                                                 f'model.dtype="{dtype}"']) for dtype in ("bfloat16", "float32")}
        batches, warmup, repeats = (1, 15), 3, 20
    rows = []
    for dtype, config in variants.items():
        for batch in batches:
            result = execute(ctx.workdir(f"b{batch}"), False, config=config, data="synthetic", category=None,
                             batch=batch, ks=(30,), warmup=warmup, repeats=repeats)
            total = result["per_k"]["30"]["total_ms"]["median"]
            rows.append({"dtype": dtype, "batch": batch, "total_ms": total, "extract_ms": result["extract_ms"]["median"],
                         "maps_ms": result["per_k"]["30"]["maps_ms"]["median"], "ms_per_image": total / batch,
                         "goal_met": total <= GOALS["latency_ms"], "detail": result})
            ctx.record(rows=rows)
    ctx.record(rows=rows, goal_ms=GOALS["latency_ms"], paper_a100_ms=105, headline="; ".join(
        f"{r['dtype']} batch {r['batch']}: {r['total_ms']:.1f} ms" for r in rows) + f" (goal <= {GOALS['latency_ms']:.0f} ms)")


# ----------------------------------------------------------------------------------------------
# matmul peaks (the MFU denominators), measured in the section that needs them

def matmul_peak_flops(dtype: str, size: int, repeats: int = 5) -> dict[str, float]:
    """Achieved FLOP/s of one size x size x size matmul on random data, JAX and (on a GPU) torch;
    "peak" is the larger."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), dtype=jnp.dtype(dtype))
    matmul = jax.jit(lambda a: a @ a)
    rates = {"jax": 2.0 * size ** 3 / median_time(lambda: matmul(a).block_until_ready(), repeats)}
    import torch

    if torch.cuda.is_available():
        t = torch.randn(size, size, device="cuda", dtype=getattr(torch, dtype))
        rates["torch"] = 2.0 * size ** 3 / median_time(lambda: ((t @ t), torch.cuda.synchronize()), repeats)
    rates["peak"] = max(rates.values())
    return rates


# ----------------------------------------------------------------------------------------------
# backbones: forward throughput

def section_backbones(ctx: Context) -> None:
    from benchmarks.backbones import bench_model

    ctx.require_gpu()
    if ctx.smoke:
        models, dtype, batches, rounds, device, compile_torch = ("dinov2-small", "hiera-tiny"), "float32", (1,), 1, "cpu", False
        ctx.record(torch_compile="skipped in --smoke: torch.compile's C++ build takes minutes on a CPU")
    else:
        models, dtype, batches, rounds, device, compile_torch = ("dinov2-small", "hiera-huge"), "bfloat16", (64, 256), 5, "cuda", True
    peak = matmul_peak_flops(dtype, 128 if ctx.smoke else 8192)
    ctx.record(dtype=dtype, matmul_flops=peak)
    rows = []
    for batch in batches:
        for model in models:
            row = bench_model(model, dtype, batch, rounds, device, compile_torch)
            for runner in ("jax", "torch_eager", "torch_compile"):
                if f"{runner}_images_per_s" in row:
                    row[f"{runner}_mfu_measured_peak"] = row["gflops_per_image"] * 1e9 * row[f"{runner}_images_per_s"] / peak["peak"]
            rows.append(row)
            ctx.record(rows=rows)
    ctx.record(rows=rows, pairs=backbone_pairs(rows, models), headline=backbone_headline(rows, models))


def backbone_pairs(rows: list[dict], models) -> dict:
    """Both backbones on the same images (the NexViTAD encoder): images/s and MFU per runner and batch."""
    pairs = {}
    for batch in sorted({row["batch"] for row in rows}):
        both = {row["model"]: row for row in rows if row["batch"] == batch}
        if set(models) > set(both):
            continue
        pair = {}
        for runner in ("jax", "torch_eager", "torch_compile"):
            if all(f"{runner}_images_per_s" in both[m] for m in models):
                seconds = sum(1 / both[m][f"{runner}_images_per_s"] for m in models)
                pair[f"{runner}_images_per_s"] = 1 / seconds
                pair[f"{runner}_mfu"] = sum(both[m][f"{runner}_mfu_measured_peak"] / both[m][f"{runner}_images_per_s"]
                                            for m in models) / seconds
        if "torch_compile_images_per_s" in pair:
            pair["jax_over_torch_compile"] = pair["jax_images_per_s"] / pair["torch_compile_images_per_s"]
        pairs[str(batch)] = pair
    return pairs


def backbone_headline(rows: list[dict], models) -> str:
    parts = []
    for batch, pair in backbone_pairs(rows, models).items():
        text = f"batch {batch}: JAX {pair['jax_images_per_s']:.0f} img/s, MFU {pair['jax_mfu']:.0%}"
        if "jax_over_torch_compile" in pair:
            text += f", {pair['jax_over_torch_compile']:.2f}x torch.compile"
        parts.append(text)
    return " + ".join(models) + ": " + "; ".join(parts) + (
        f" (goals >= {GOALS['backbones_over_torch_compile']}x, >= {GOALS['backbones_mfu']:.0%})")


# ----------------------------------------------------------------------------------------------
# train step: the paper config's phase-2 step, JAX and the PyTorch reference in separate processes

def train_split(ctx: Context) -> tuple[int, int]:
    """The paper's 11/1 split (52 images a step at 4 per class); --smoke: 2/1, one image per class."""
    return (2, 1) if ctx.smoke else (11, 1)


def train_config(ctx: Context, dtype: str):
    from benchmarks.train_step import paper_config_with
    from nexvitad_jax.config import load_config

    if ctx.smoke:
        config = load_config("tiny", [f'model.dtype="{dtype}"'])
        config.train.source_per_class = config.train.target_per_class = 1
        return config
    return paper_config_with(per_class=4, dtype=dtype)


def jax_train_row(config, split: tuple[int, int], rounds: int, peak: float) -> dict:
    """The JAX phase-2 step: compiled ahead of time (its FLOPs and memory read off the program),
    then timed; the backbones alone; the device's peak memory."""
    import jax

    from benchmarks.train_step import (backbone_gflops_per_image, jax_trainer, per_class_arrays, placed_batch,
                                       step_batch)

    trainer, holder = jax_trainer(config, *split)
    placed = placed_batch(trainer, step_batch(trainer, per_class_arrays(config, *split)))
    began = time.perf_counter()
    lowered = trainer._step[2].lower(holder["state"], trainer.frozen, placed)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - began
    backbones = trainer._backbone_features.lower(holder["state"], trainer.frozen, placed["images"])
    rows = placed["images"].shape[0]
    flops = (flops_of(lowered) - flops_of(backbones)) + backbone_gflops_per_image(config) * 1e9 * rows

    def step():
        holder["state"], metrics = compiled(holder["state"], trainer.frozen, placed)
        jax.block_until_ready(metrics["loss"])

    seconds = median_time(step, rounds)
    images = split[0] * trainer.layout.per_source + 2 * split[1] * trainer.layout.per_target
    memory = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    return {"head_batching": str(config.model.head_batching), "images_per_step": images, "compile_s": compile_s,
            "step_s": seconds, "images_per_s": images / seconds,
            "step_tflop": flops / 1e12, "mfu": flops / seconds / peak,
            "memory_analysis": {k: int(getattr(memory, k)) for k in dir(memory) if k.endswith("_in_bytes")},
            "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"), "top_ops_ms": top_ops_ms(step, compiled)}


def top_ops_ms(run: Callable[[], None], compiled, count: int = 15) -> list[dict]:
    """Where one call of `run` spends its time: a profiler trace of it, the XLA ops' (GPU kernels',
    CPU thunks') durations summed by name, longest first, each with its HLO instruction."""
    import glob
    import gzip

    import jax

    folder = tempfile.mkdtemp(prefix="device_check_trace_")
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
    totals: dict[str, float] = {}
    for event in trace["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith("$") and "::" not in name and "(" not in name:  # ops only
            totals[name] = totals.get(name, 0.0) + event.get("dur", 0) / 1e3
    hlo = {line.split(" = ")[0].strip().lstrip("%"): line.strip()[:300] for line in compiled.as_text().splitlines()
           if " = " in line}
    return [{"op": name, "ms": round(ms, 3), "hlo": hlo.get(name, "")}
            for name, ms in sorted(totals.items(), key=lambda item: -item[1])[:count]]


def flops_of(lowered) -> float:
    analysis = lowered.cost_analysis()
    return float((analysis if isinstance(analysis, dict) else analysis[0])["flops"])


def section_train_step_jax(ctx: Context) -> None:
    ctx.require_gpu()
    # --smoke: fp32 only (the bf16 program differs in dtypes alone, and compiling costs most of the time).
    dtypes = ("float32",) if ctx.smoke else ("float32", "bfloat16")
    peaks = {dtype: matmul_peak_flops(dtype, 128 if ctx.smoke else 8192) for dtype in dtypes}
    ctx.record(split="/".join(map(str, train_split(ctx))), matmul_flops=peaks,
               note="fp32 peak: the default matmul precision (TF32 on GPUs)")
    rows = {}
    for dtype in dtypes:
        rows[dtype] = jax_train_row(train_config(ctx, dtype), train_split(ctx), 1 if ctx.smoke else 5,
                                    peaks[dtype]["peak"])
        ctx.record(rows=rows)
    ctx.record(rows=rows, headline="; ".join(f"{dtype}: {row['images_per_s']:.1f} img/s, MFU {row['mfu']:.0%}"
                                             for dtype, row in rows.items()))


def torch_train_rows(ctx: Context, dtype: str, rounds: int, compile_too: bool) -> dict:
    """The reference's step (fp32, or bf16 autocast) eager, then torch.compile."""
    from benchmarks.train_step import per_class_arrays, torch_candidates, torch_compiled

    config, split = train_config(ctx, "float32"), train_split(ctx)
    device = "cpu" if ctx.smoke else "cuda"
    arrays = per_class_arrays(config, *split)
    images = split[0] * int(config.train.source_per_class) + 2 * split[1] * int(config.train.target_per_class)
    candidates, eager = torch_candidates(config, arrays, *split, device=device, autocast=dtype == "bfloat16")
    seconds = median_time(candidates["torch_eager"], rounds)
    row = {"eager": {"step_s": seconds, "images_per_s": images / seconds}}
    ctx.record(**{f"rows_{dtype}": row})
    if compile_too:
        compiled, compile_s, error = torch_compiled(eager)
        row["compile"] = {"compile_s": compile_s, "error": error}
        if compiled:
            seconds = median_time(compiled, rounds)
            row["compile"] |= {"step_s": seconds, "images_per_s": images / seconds}
    return row


def section_train_step_torch(ctx: Context) -> None:
    import torch

    ctx.require_gpu()
    # fp32 matmuls as JAX's default precision runs them on GPUs (TF32), for a like-for-like step.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx.record(tf32=True)
    if ctx.smoke:
        ctx.record(torch_compile="skipped in --smoke: torch.compile's C++ build takes minutes on a CPU")
    rounds = 1 if ctx.smoke else 5
    rows = {"float32": torch_train_rows(ctx, "float32", rounds, compile_too=not ctx.smoke)}
    ctx.record(rows=rows)
    rows["bfloat16"] = torch_train_rows(ctx, "bfloat16", rounds, compile_too=False)
    ctx.record(rows=rows, ratios=train_ratios(ctx.out, rows))
    ctx.record(headline=train_headline(ctx.result["ratios"]))


def train_ratios(out: Path, torch_rows: dict) -> dict:
    """JAX's step (the train_step_jax section's file) over the reference's, per dtype."""
    jax_file = out / "train_step_jax.json"
    jax_rows = json.loads(jax_file.read_text()).get("rows", {}) if jax_file.is_file() else {}
    ratios = {}
    for dtype, row in torch_rows.items():
        if dtype not in jax_rows:
            continue
        ratios[dtype] = {"jax_over_torch_eager": jax_rows[dtype]["images_per_s"] / row["eager"]["images_per_s"]}
        if "images_per_s" in row.get("compile", {}):
            ratios[dtype]["jax_over_torch_compile"] = jax_rows[dtype]["images_per_s"] / row["compile"]["images_per_s"]
    return ratios


def train_headline(ratios: dict) -> str:
    if not ratios:
        return "no JAX figures to compare with (the train_step_jax section did not finish)"
    return "; ".join(f"{dtype}: " + ", ".join(f"{name.removeprefix('jax_over_')} {value:.2f}x"
                                              for name, value in row.items()) for dtype, row in ratios.items()) + (
        f" (goals >= {GOALS['train_over_torch_eager']}x eager, >= {GOALS['train_over_torch_compile']}x compiled)")


# ----------------------------------------------------------------------------------------------
# end to end: `nexvitad run`

def run_nexvitad(ctx: Context, arguments: list[str]) -> None:
    """`nexvitad run ARGUMENTS` in a scratch workdir (its own process: the section's deadline stops it)."""
    workdir = ctx.workdir("run")
    command = [sys.executable, "-m", "nexvitad_jax.cli", "run", *arguments, "--workdir", str(workdir), "--no-progress"]
    ctx.record(command=" ".join(command[1:]), workdir=str(workdir))
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - began
    ctx.record(returncode=done.returncode, wall_s=seconds, output_tail=(done.stdout + done.stderr)[-3000:])
    if done.returncode:
        raise RuntimeError(f"nexvitad run exited with {done.returncode}: {(done.stderr or done.stdout)[-500:]}")
    metrics = json.loads((workdir / "metrics.json").read_text())
    ctx.record(split=metrics.get("split"), target=metrics.get("target"), train_steps=metrics.get("train_steps"),
               mean=metrics.get("mean"), timings=metrics.get("timings"), random_backbones=metrics.get("random_backbones"),
               headline=f"{seconds:.0f} s end to end, {metrics.get('train_steps')} steps, mean pixel AUROC "
                        + ", ".join(f"{m} {v.get('pixel_auroc', float('nan')):.3f}"
                                    for m, v in (metrics.get("mean") or {}).items()))


def section_e2e_default(ctx: Context) -> None:
    ctx.require_gpu()
    # --smoke: the tiny config (64 px) for one step per phase instead of the demo config's 128 px run.
    run_nexvitad(ctx, ["--config", "tiny", "--set", "train.steps_per_epoch=1", "--set", "train.fast_compile=True"]
                 if ctx.smoke else [])


PAPER_RUN = ["--config", "paper", "--data", "synthetic", "--set", 'model.hiera_checkpoint=""', "--set",
             'model.dinov2_checkpoint=""', "--set", "train.epochs=2", "--set", "train.phase1_epochs=1",
             "--set", "train.steps_per_epoch=2", "--set", "train.warmup_steps=1"]


def section_e2e_paper(ctx: Context) -> None:
    from nexvitad_jax.config import load_config

    ctx.require_gpu()
    overrides = [value for flag, value in zip(PAPER_RUN, PAPER_RUN[1:]) if flag == "--set"]
    config = load_config("paper", overrides)  # the command's config, checked before anything runs
    ctx.record(config_checked={"hiera": config.model.hiera.to_dict(), "image_size": config.data.image_size,
                               "epochs": config.train.epochs, "steps_per_epoch": config.train.steps_per_epoch})
    if ctx.smoke:
        raise Skipped("--smoke runs one end-to-end job (e2e_default, the tiny config) and only checks this "
                      f"one's config: nexvitad run {' '.join(PAPER_RUN)} (full-size random backbones: a GPU's job)")
    run_nexvitad(ctx, PAPER_RUN)


# ----------------------------------------------------------------------------------------------
# the sections, their deadlines and environments; running one, and all of them

@dataclasses.dataclass(frozen=True)
class Section:
    run: Callable[[Context], None]
    deadline_s: float
    smoke_deadline_s: float
    torch_too: bool = False  # shares the device with PyTorch: XLA takes less of it
    # Runs beside the neighbouring concurrent sections (they time nothing another could disturb,
    # and spend their time compiling and searching on the host); XLA allocates as it goes.
    concurrent: bool = False


# Deadlines on a GPU: 410 s end to end (under 7 minutes with the processes' starts); a section cut
# there runs again alone with a longer one (--sections NAME --deadline NAME=SECONDS). With --smoke
# they only stop a hung section: a quiet 2-core machine runs the whole smoke in about 3 minutes.
SECTIONS = {
    "environment": Section(section_environment, 15, 60),
    "parity": Section(section_parity, 55, 120, torch_too=True),
    "kmeans": Section(section_kmeans, 60, 120),
    "latency": Section(section_latency, 45, 180),
    "backbones": Section(section_backbones, 80, 180, torch_too=True),
    "train_step_jax": Section(section_train_step_jax, 40, 180),
    "train_step_torch": Section(section_train_step_torch, 40, 120, torch_too=True),
    "weights": Section(section_weights, 75, 120, concurrent=True),
    "e2e_default": Section(section_e2e_default, 75, 300, concurrent=True),
    "e2e_paper": Section(section_e2e_paper, 75, 60, concurrent=True),
}


def run_section(name: str, out: Path, smoke: bool) -> int:
    """In the section's own process: run it and record how it ended."""
    ctx = Context(name, out, smoke)
    began = time.perf_counter()
    ctx.record(section=name, status="running", smoke=smoke)
    try:
        SECTIONS[name].run(ctx)
        ctx.result["status"] = "ok"
    except Skipped as skipped:
        ctx.result |= {"status": "skipped", "reason": str(skipped)}
    except Exception as error:  # recorded, and the next section runs
        ctx.result |= {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
    ctx.record(seconds=round(time.perf_counter() - began, 1))
    return 0


# --smoke compiles for compile speed (the figures are not the point there; nexvitad_jax.compilation
# says why these flags): the ones the installed XLA accepts, probed once (XLA aborts on unknown flags).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                      "--xla_llvm_disable_expensive_passes=true")


def accepted_xla_flags(flags) -> str:
    def accepted(candidate: str) -> bool:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {candidate}")
        probe = [sys.executable, "-c", "import jax.numpy as jnp; (jnp.zeros(2) + 1).block_until_ready()"]
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0

    joined = " ".join(flags)
    return joined if accepted(joined) else " ".join(flag for flag in flags if accepted(flag))


def section_environment_variables(section: Section, smoke: bool, xla_flags: str = "") -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:  # the CPU, for both frameworks, whatever the machine has
        env |= {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
                "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
    elif section.concurrent:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".45" if section.torch_too else ".9")
    return env


@dataclasses.dataclass
class Running:
    """A section's process (its own process group, so a deadline stops what it started too)."""
    name: str
    child: subprocess.Popen
    log: Path
    began: float


def start_section(name: str, out: Path, smoke: bool, xla_flags: str) -> Running:
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out)]
    command += ["--smoke"] if smoke else []
    with log.open("w") as stream:
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                 env=section_environment_variables(SECTIONS[name], smoke, xla_flags),
                                 start_new_session=True)
    return Running(name, child, log, time.perf_counter())


def finish_section(running: Running, out: Path, deadline: float) -> dict:
    """Wait for the section until `deadline` seconds after its start, else stop it; its JSON,
    completed with how it ended."""
    try:
        running.child.wait(timeout=max(deadline - (time.perf_counter() - running.began), 0.01))
        cut = False
    except subprocess.TimeoutExpired:
        os.killpg(running.child.pid, signal.SIGKILL)
        running.child.wait()
        cut = True
    path = out / f"{running.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"section": running.name}
    result["wall_s"] = round(time.perf_counter() - running.began, 1)
    if cut:
        result |= {"status": "cut", "reason": f"over its {deadline:.0f} s deadline; the results above are what "
                                              "it recorded before"}
    elif result.get("status") in (None, "running"):
        result |= {"status": "failed", "reason": f"the section's process exited with {running.child.returncode} "
                                                 "before recording an outcome"}
    if result["status"] in ("cut", "failed"):
        result["log_tail"] = running.log.read_text(errors="replace")[-3000:]
    write_json(path, result)
    return result


def batches_of(names: list[str]) -> list[list[str]]:
    """The order of the run: each section alone, except neighbouring concurrent ones together."""
    batches: list[list[str]] = []
    for name in names:
        if batches and SECTIONS[name].concurrent and all(SECTIONS[n].concurrent for n in batches[-1]):
            batches[-1].append(name)
        else:
            batches.append([name])
    return batches


def summary_markdown(results: dict[str, dict], smoke: bool, total_s: float) -> str:
    lines = [f"# device_check{' --smoke (CPU, tiny sizes: not the figures)' if smoke else ''}", "",
             f"{len(results)} sections in {total_s:.0f} s.", "", "| section | status | s | result |", "|---|---|---|---|"]
    for name, result in results.items():
        detail = result.get("headline") or result.get("reason") or ""
        lines.append(f"| {name} | {result.get('status')} | {result.get('wall_s', '')} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for SECTION.json, summary.md, logs/")
    parser.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in this order by default")
    parser.add_argument("--deadline", action="append", default=[], metavar="SECTION=SECONDS",
                        help="another deadline for a section (repeatable)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_section(args.section, args.out, args.smoke)
    names = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    deadlines = {name: SECTIONS[name].smoke_deadline_s if args.smoke else SECTIONS[name].deadline_s for name in names}
    for item in args.deadline:
        name, _, seconds = item.partition("=")
        if name not in deadlines:
            parser.error(f"--deadline {item}: expected SECTION=SECONDS for one of {names}")
        deadlines[name] = float(seconds)
    began, results = time.perf_counter(), {}
    xla_flags = accepted_xla_flags(FAST_COMPILE_FLAGS) if args.smoke else ""
    for batch in batches_of(names):
        running = [start_section(name, args.out, args.smoke, xla_flags) for name in batch]
        for section in running:
            result = results[section.name] = finish_section(section, args.out, deadlines[section.name])
            print(f"{section.name}: {result['status']} in {result['wall_s']} s "
                  f"{result.get('headline') or result.get('reason') or ''}", flush=True)
            write_json(args.out / "device_check.json", {"smoke": args.smoke, "deadlines_s": deadlines,
                                                        "smoke_xla_flags": xla_flags, "sections": results})
            (args.out / "summary.md").write_text(summary_markdown(results, args.smoke, time.perf_counter() - began))
    print(summary_markdown(results, args.smoke, time.perf_counter() - began))
    return 0


if __name__ == "__main__":
    sys.exit(main())

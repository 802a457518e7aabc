"""Backbone forward throughput: this project's jitted JAX vs the transformers PyTorch model.

Same random weights (moved by the converter), same batch, dtype and input size (224), measured
side by side in one process, alternating the two frameworks each round; images/s and the JAX /
PyTorch ratio. FLOPs per image are counted from the model dimensions (XLA's cost analysis counts
a scanned layer once, so it cannot serve), giving MFU on accelerators.

    python benchmarks/backbones.py            # CPU: dinov2-small, hiera-tiny, hiera-huge, fp32 + bf16
    python benchmarks/backbones.py --quick    # seconds: small batch, dinov2-small + hiera-tiny, fp32
    python benchmarks/backbones.py --device-bench   # GPU: bf16, batch 64 and 256, eager + torch.compile, MFU
    python benchmarks/backbones.py --dinov2-attention --threads 1 --rounds 20 --out FILE   # CPU grouping

Results: benchmarks/results/backbones.json (or --out). On a shared CPU, pin with `--threads 1` and
read the `*_cpu_time` ratios (process CPU time; see `time_side_by_side`) next to the wall ratios.

XLA flags: the benchmark sets none; it records `XLA_FLAGS` from the environment. XLA:CPU hands dots,
reductions and elementwise ops to YNNPACK by default; on the AVX-512 CPU measured here XLA's own
(Eigen) path is faster for these models in fp32, because YNNPACK's fusions of the attention transposes
and of Hiera's query max-pool run slower than plain ops. Turning it off is an ordinary user setting
(an empty list of YNNPACK fusion types), measured separately:

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/backbones.py --threads 1 \
        --dtypes float32 --out benchmarks/results/backbones_xla_ynn_off.json

bf16 on CPU: XLA:CPU's bf16 dots (YNNPACK, Eigen or XNNPACK alike) run at its fp32 rate, about half
of PyTorch's oneDNN AVX512-BF16 kernels on this CPU, which bounds the bf16 ratio near 0.4-0.6x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODELS = {"dinov2-small": ("dinov2", "small"), "hiera-tiny": ("hiera", "tiny"), "hiera-base": ("hiera", "base"),
          "hiera-huge": ("hiera", "huge")}
DEFAULT_MODELS = ["dinov2-small", "hiera-tiny", "hiera-huge"]  # hiera-base on request (--models)
IMAGE_SIZE = 224
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


# ----------------------------------------------------------------------------------------------
# FLOPs from the model dimensions (a multiply-add = 2 FLOPs; norms, softmax, activations ignored).

def dinov2_flops(config, image_hw=(IMAGE_SIZE, IMAGE_SIZE)) -> float:
    grid = [s // config.patch_size for s in image_hw]
    patches = math.prod(grid)
    tokens = 1 + config.num_register_tokens + patches
    d, h = config.hidden_size, config.mlp_hidden_size
    patch_embed = 2 * patches * config.patch_size ** 2 * config.num_channels * d
    attention = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d
    mlp = 2 * tokens * d * h * (3 if config.use_swiglu_ffn else 2)
    return float(patch_embed + config.num_hidden_layers * (attention + mlp))


def hiera_flops(config, image_hw=(IMAGE_SIZE, IMAGE_SIZE)) -> float:
    tokens = math.prod(s // p for s, p in zip(image_hw, config.patch_stride))
    total = 2 * tokens * math.prod(config.patch_size) * config.num_channels * config.embed_dim
    query_stride = math.prod(config.query_stride)
    dim_in = config.embed_dim
    for stage, (depth, dim_out) in enumerate(zip(config.depths, config.stage_dims)):
        window = int(math.prod(config.masked_unit_size) * query_stride ** -stage)
        for layer in range(depth):
            pools = layer == 0 and 1 <= stage <= config.num_query_pool
            stride = query_stride if pools else 1
            mua = config.masked_unit_attention[stage] or (layer == 0 and config.masked_unit_attention[max(stage - 1, 0)])
            windows = tokens // (stride * window) if mua else 1
            out_tokens = tokens // stride
            keys_per_window = tokens // windows
            total += 2 * tokens * dim_in * 3 * dim_out                 # qkv on the input tokens
            total += 2 * 2 * out_tokens * keys_per_window * dim_out     # scores + weighted values
            total += 2 * out_tokens * dim_out * dim_out                 # attention projection
            total += 2 * 2 * out_tokens * dim_out * int(dim_out * config.mlp_ratio)
            if dim_in != dim_out:
                total += 2 * tokens * dim_in * dim_out                  # residual width change
            tokens, dim_in = out_tokens, dim_out
    return float(total)


FLOP_COUNTERS = {"dinov2": dinov2_flops, "hiera": hiera_flops}


# ----------------------------------------------------------------------------------------------

def build_pair(name: str, dtype: str, device: str):
    """(torch model, jitted JAX forward, JAX params state, config) with the same random weights."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from converters.common import converter_for
    from nexvitad_jax.models import instantiate_backbone, resolve_config

    family, variant = MODELS[name]
    converter = converter_for(family)
    config = resolve_config(family, variant)
    torch.manual_seed(0)
    torch_model = converter.build_torch(config)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = converter.convert(state, config, "hf")
    del state
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    module = instantiate_backbone(family, config, params, dtype=jax_dtype, param_dtype=jax_dtype)
    del params
    graphdef, jax_state = nnx.split(module)

    @jax.jit
    def forward(model_state, pixels):
        return nnx.merge(graphdef, model_state)(pixels)

    torch_model = torch_model.to(device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    return torch_model, forward, jax_state, config, family


def torch_call(torch_model, family: str):
    import torch

    def call(pixels):
        with torch.inference_mode():
            if family == "hiera":  # the stage maps, as the JAX port returns
                return torch_model(pixels, output_hidden_states=True).reshaped_hidden_states
            return torch_model(pixels).last_hidden_state

    return call


def time_side_by_side(runners: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds per call of each runner, alternating
    runners every round.

    On a shared machine the wall time of a pinned process includes the time other processes hold
    its core, which swings the wall ratio by +-10% between runs; the process CPU time (all threads)
    counts only the work done, so its ratio is the stable one there. On a quiet machine with one
    core per thread the two agree. (With several threads, spin-waiting workers count as CPU time.)"""
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda times: {name: statistics.median(values) for name, values in times.items()}
    return median(wall), median(cpu)


def bench_model(name: str, dtype: str, batch: int, rounds: int, device: str, compile_torch: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    torch_model, forward, jax_state, config, family = build_pair(name, dtype, device)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    pixels_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=torch_dtype)
    pixels_jax = jax.device_put(jnp.asarray(images, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    eager = torch_call(torch_model, family)
    runners = {"jax": lambda: jax.block_until_ready(forward(jax_state, pixels_jax)),
               "torch_eager": lambda: (eager(pixels_torch), sync())}
    if compile_torch:
        compiled_model = torch.compile(torch_model)
        compiled = torch_call(compiled_model, family)
        runners["torch_compile"] = lambda: (compiled(pixels_torch), sync())
    compile_start = time.perf_counter()
    for run in runners.values():  # warm-up: compile / autotune / caches
        run()
        run()
    warmup_s = time.perf_counter() - compile_start
    seconds, cpu_seconds = time_side_by_side(runners, rounds)

    flops = FLOP_COUNTERS[family](config)
    result = {"model": name, "dtype": dtype, "batch": batch, "image_size": IMAGE_SIZE, "rounds": rounds,
              "warmup_s": round(warmup_s, 2), "gflops_per_image": round(flops / 1e9, 3)}
    for runner, secs in seconds.items():
        result[f"{runner}_images_per_s"] = round(batch / secs, 3)
    for runner in seconds:
        if runner != "jax":
            result[f"jax_over_{runner}"] = round(seconds[runner] / seconds["jax"], 3)
    if device == "cpu":
        for runner, secs in cpu_seconds.items():
            result[f"{runner}_images_per_cpu_s"] = round(batch / secs, 3)
        for runner in cpu_seconds:
            if runner != "jax":
                result[f"jax_over_{runner}_cpu_time"] = round(cpu_seconds[runner] / cpu_seconds["jax"], 3)
    if device == "cuda":
        peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            for runner, secs in seconds.items():
                result[f"{runner}_mfu"] = round(flops * batch / secs / peak, 4)
    del torch_model, jax_state
    return result


def environment(device: str) -> dict:
    import jax
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_cores_used": len(os.sched_getaffinity(0)),
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()], "device": device,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_dinov2_attention_groups(batch: int, rounds: int) -> dict:
    """DINOv2-S attention alone at 224 (257 tokens, 6 heads of 64), fp32: the library's CPU grouping
    (`multi_head_attention`: groups of images whose scores fit in `cache_bytes`) vs the whole batch
    in one `jax.nn.dot_product_attention`."""
    import functools

    import jax
    import jax.numpy as jnp

    from nexvitad_jax.models.dinov2 import multi_head_attention

    shape = (batch, 257, 6, 64)
    query, key, value = (jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32) for i in range(3))
    calls = {name: jax.jit(functools.partial(multi_head_attention, cache_bytes=cache_bytes))
             for name, cache_bytes in (("grouped_1mb", 1 << 20), ("whole_batch", 1 << 62))}
    runners = {name: functools.partial(lambda call: jax.block_until_ready(call(query, key, value)), call)
               for name, call in calls.items()}
    for run in runners.values():  # compile
        run()
    seconds, cpu_seconds = time_side_by_side(runners, rounds)
    row = {"what": "dinov2-small attention (one layer)", "batch": batch, "rounds": rounds, "dtype": "float32"}
    row.update({f"{name}_ms": round(1e3 * secs, 3) for name, secs in seconds.items()})
    row.update({f"{name}_cpu_ms": round(1e3 * secs, 3) for name, secs in cpu_seconds.items()})
    row["whole_over_grouped_cpu_time"] = round(cpu_seconds["whole_batch"] / cpu_seconds["grouped_1mb"], 3)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: batch 2, 3 rounds, no hiera-huge, fp32")
    parser.add_argument("--device-bench", action="store_true",
                        help="GPU: bf16 at batch 64 and 256, PyTorch eager and torch.compile, MFU")
    parser.add_argument("--dinov2-attention", action="store_true",
                        help="CPU: DINOv2-S attention alone, the library's grouping vs the whole batch at once")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {sorted(MODELS)}")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores for both frameworks (process affinity + torch.set_num_threads)")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (always on GPU)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "backbones.json")
    args = parser.parse_args(argv)
    if args.device_bench:
        args.device, dtypes, batches, rounds, compile_torch = "cuda", ["bfloat16"], [64, 256], 10, True
        models = DEFAULT_MODELS
    elif args.quick:
        args.device, dtypes, batches, rounds, compile_torch = "cpu", ["float32"], [2], 3, False
        models = ["dinov2-small", "hiera-tiny"]
    else:
        args.device, dtypes, batches, rounds, compile_torch = "cpu", ["float32", "bfloat16"], [8], 5, False
        models = DEFAULT_MODELS
    args.rounds, args.compile_torch = args.rounds or rounds, compile_torch or args.torch_compile
    args.models = args.models.split(",") if args.models else models
    args.dtypes = args.dtypes.split(",") if args.dtypes else dtypes
    args.batches = [args.batch] if args.batch else batches
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {sorted(MODELS)}")
    return args


def pair_throughput(results: list[dict], batches: list[int]) -> dict:
    """The NexViTAD pair, Hiera-Huge + DINOv2-S on the same image, per batch size."""
    summary = {}
    for batch in batches:
        rows = {r["model"]: r for r in results if r["batch"] == batch}
        if {"hiera-huge", "dinov2-small"} <= set(rows):
            pair = {}
            for runner in ("jax", "torch_eager", "torch_compile"):
                key = f"{runner}_images_per_s"
                pair[key] = round(1 / (1 / rows["hiera-huge"][key] + 1 / rows["dinov2-small"][key]), 2)
            pair["jax_over_torch_compile"] = round(pair["jax_images_per_s"] / pair["torch_compile_images_per_s"], 3)
            summary[f"hiera_huge_plus_dinov2_small_batch{batch}"] = pair
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:  # pin the process (both frameworks) to N cores, before jax starts its thread pool
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device_bench and not torch.cuda.is_available():
        sys.exit("--device-bench needs a CUDA GPU (torch.cuda.is_available() is False)")

    results = []
    if args.dinov2_attention:
        results.append(bench_dinov2_attention_groups(args.batch or 8, args.rounds))
    jobs = [] if args.dinov2_attention else [(m, d, b) for m in args.models for d in args.dtypes for b in args.batches]
    for model, dtype, batch in tqdm(jobs, desc="backbones"):
        # Huge on CPU: a smaller batch keeps one round to seconds.
        use_batch = min(batch, 2) if model == "hiera-huge" and args.device == "cpu" else batch
        row = bench_model(model, dtype, use_batch, args.rounds, args.device, args.compile_torch)
        tqdm.write(json.dumps(row))
        results.append(row)

    mode = "device" if args.device_bench else "quick" if args.quick else "cpu"
    summary = {"mode": "dinov2-attention" if args.dinov2_attention else mode,
               "command": "python benchmarks/backbones.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "environment": environment(args.device), "results": results}
    if args.device_bench:
        summary.update(pair_throughput(results, args.batches))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

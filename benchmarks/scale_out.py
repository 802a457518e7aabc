"""Scale-out: what Sinkhorn K-means and the train step exchange between devices and what each
device holds, from ahead-of-time compilation on fake CPU devices, projected onto H100s.

    python benchmarks/scale_out.py           # all sections (~6 min on 2 CPU cores) -> benchmarks/results/scale_out.json
    python benchmarks/scale_out.py --sections kmeans,measured    # re-run some, keep the others
    python benchmarks/scale_out.py --quick   # N = 10^5, K = 8..512, no train step -> results/scale_out_quick.json

Fake device counts need a process each: the script re-invokes itself per device count
(`--worker NAME --devices n`, with XLA_FLAGS=--xla_force_host_platform_device_count=n) and collects
their JSON. Sections:
- kmeans: the K sweep K = 8, 16, ..., 4096 (one `sweep_k` program, k-means++ included) on a bank of
  N = 10^6 rows of D = 1024 float32, compiled for n = 1, 2, 4, 8 devices with the bank an abstract
  jax.ShapeDtypeStruct split along its rows (nothing is allocated): every collective of the
  compiled program (`compiled.as_text()`: op, shapes, bytes), the bytes one K-means iteration
  exchanges (the collectives' operands, checked against the formulas of `iteration_exchange`), and
  each device's memory (`compiled.memory_analysis()`: the program's arguments, outputs, temporaries).
- train: the paper config's phase-2 train step (Hiera-Huge + DINOv2-S at 224, random weights, an
  11/1 split, the config's 4 images per class) compiled for 8 devices: its all-reduces (the
  gradients' and BatchNorm's statistics), next to the trainable parameters' bytes; its FLOPs
  (benchmarks/train_step.py:step_gflops).
- roofline: both projected onto 1 and 8 H100s (`H100`): matmul FLOPs at a rate, HBM traffic at
  its bandwidth, all-reduces (ring: 2 (n - 1) / n of the bytes each way) over NVLink; next to
  faiss-gpu's published k-means figure (`FAISS`) and our solver projected on that problem.
- measured: on this CPU, the same sweep at a small size on 1 and on 2 fake devices, seconds per fit
  side by side (a sanity ratio: both share this machine's 2 cores).
Results carry the commands' arguments; the JSON's other top-level keys are kept on a partial re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results"
DEVICE_COUNTS = (1, 2, 4, 8)
FULL = {"n": 1_000_000, "d": 1024, "ks": [2 ** p for p in range(3, 13)]}
QUICK = {"n": 100_000, "d": 1024, "ks": [2 ** p for p in range(3, 10)]}
MEASURED = {"n": 40_000, "d": 64, "ks": [8, 16, 32, 64], "iterations": 5, "repeats": 5, "rounds": 2}
# Per-iteration assumptions of the projection: Newton passes per solve (warm-started solves take a
# few; a first solve from k-means++ ~30 at K = 4096, benchmarks/results/kmeans.json notes) and one
# confirming Sinkhorn iteration after Newton.
NEWTON_PASSES = (5, 30)
H100 = {"bf16_matmul_flops": 790e12,  # measured on these machines (issue 11)
        "fp32_matmul_flops": 395e12,  # the figure: half the bf16 rate (TF32 tensor cores)
        "fp32_exact_flops": 60e12,  # precision=HIGHEST as plain FP32 on CUDA cores (67 TFLOP/s peak)
        "hbm_bytes_per_s": 3.35e12, "nvlink_bytes_per_s": 450e9,  # per direction
        "all_reduce_latency_s": 15e-6}
FAISS = {"n": 1_000_000, "d": 256, "k": 20_000, "iterations": 25, "seconds": 55.0, "device": "one P100",
         "source": "faiss-gpu's published k-means figure (faiss wiki, as quoted in issue 11)"}
FLOAT = 4


ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
            "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of a compiled program's HLO text: its op, result shapes and bytes."""
    found = re.findall(r"=\s*(.*?)\s(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|"
                       r"collective-broadcast)(?:-start)?\(", hlo_text)
    rows = []
    for shapes, op in found:
        arrays = [(dtype, [int(d) for d in dims.split(",") if d])
                  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes)]
        rows.append({"op": op, "shapes": [dims for _, dims in arrays],
                     "bytes": sum(ITEMSIZE.get(dtype, 4) * _size(dims) for dtype, dims in arrays)})
    return rows


def memory_row(compiled) -> dict:
    analysis = compiled.memory_analysis()
    row = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


# ----------------------------------------------------------------------------------------------
# workers (one process per device count; each prints one JSON line)


def compile_sweep(n: int, d: int, ks: list[int], options=None):
    """The program of `sweep_k(x, ks)` (k-means++ included) on an abstract (n, d) float32 bank, split
    along its rows over this process's devices (or on its one device), compiled ahead of time."""
    import jax
    import jax.numpy as jnp

    from nexvitad_jax.inference import SolverOptions
    from nexvitad_jax.inference.sinkhorn_kmeans import _seeded_fit
    from nexvitad_jax.sharding import make_mesh, replicated, row_sharding

    mesh = make_mesh() if jax.device_count() > 1 else None
    bank = row_sharding(mesh) if mesh else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    small = replicated(mesh) if mesh else bank
    x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=bank)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=small)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=small)
    return _seeded_fit.lower(x, key, scalar, scalar, 100, ks=tuple(ks), options=options or SolverOptions(),
                             mesh=mesh, rows=n).compile()


def kmeans_worker(n: int, d: int, ks: list[int]) -> dict:
    """The sweep's program compiled for this process's devices: collectives and memory per device."""
    import jax

    from nexvitad_jax.inference import SolverOptions
    from nexvitad_jax.inference.sinkhorn_kmeans import SweepLayout

    began, devices, options = time.perf_counter(), jax.device_count(), SolverOptions()
    compiled = compile_sweep(n, d, ks, options)
    return {"devices": devices, "compile_s": round(time.perf_counter() - began, 1), "memory": memory_row(compiled),
            "stores_costs": SweepLayout(tuple(ks), options.group_pad_ratio).stores_costs(n // devices, d, FLOAT,
                                                                                         options),
            "collectives": collectives(compiled.as_text())}


def _size(shape: list[int]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def train_worker() -> dict:
    """The paper config's phase-2 step compiled for this process's devices: its collectives by op
    (and the largest), the trainable parameters' bytes (the gradients a data-parallel step must
    all-reduce), and (shapes only) the step's FLOPs."""
    import unittest.mock

    import jax
    from flax import nnx

    from benchmarks.train_step import abstract_batch, abstract_state, step_gflops
    from nexvitad_jax.configs import paper
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.step import TrainStep

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""  # random weights: shapes only
    model = nnx.eval_shape(lambda: build_model(config, 11, 1))
    config.train.fast_compile = True  # LLVM at level 0: the program's collectives are the same
    with unittest.mock.patch("jax.device_put", lambda x, *args, **kwargs: x):  # abstract values stay abstract
        trainer = TrainStep.from_config(config, model, make_mesh(), total_steps=1000)
    state, batch = abstract_state(trainer), abstract_batch(config, trainer, 2)
    began = time.perf_counter()
    compiled = trainer._step[2].lower(state, trainer.frozen, batch).compile()
    compile_s, ops = round(time.perf_counter() - began, 1), collectives(compiled.as_text())
    config.train.fast_compile = False
    return {"devices": jax.device_count(), "compile_s": compile_s, "images": int(batch["images"].shape[0]),
            "trainable_bytes": sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state["trainable"])),
            "bytes_by_op": {op: sum(row["bytes"] for row in ops if row["op"] == op) for op in {r["op"] for r in ops}},
            "largest": sorted(ops, key=lambda row: -row["bytes"])[:12], "collectives": ops,
            "memory": memory_row(compiled), "gflops": step_gflops(config, 11, 1, phase=2)}


def measured_worker() -> dict:
    """sweep_k at MEASURED's size on this process's devices (the bank split along its rows when
    there are several): seconds per fit, compiled first, a fixed number of iterations."""
    import jax

    from benchmarks.kmeans import feature_bank, load_average, median_time
    from nexvitad_jax.inference import sweep_k
    from nexvitad_jax.sharding import make_mesh, row_sharding

    x = feature_bank(MEASURED["n"], MEASURED["d"])
    if jax.device_count() > 1:
        x = jax.device_put(x, row_sharding(make_mesh()))
    fit = lambda: jax.block_until_ready(sweep_k(x, MEASURED["ks"], rng=jax.random.key(0), tol=0.0,
                                                max_iters=MEASURED["iterations"]).prototypes)
    seconds = median_time(fit, MEASURED["repeats"])
    return {"devices": jax.device_count(), "seconds_per_fit": seconds, "load_average": load_average()}


WORKERS = {"kmeans": kmeans_worker, "train": train_worker, "measured": measured_worker}


def run_worker(name: str, devices: int, args: dict | None = None) -> dict:
    """A worker in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-args",
                           json.dumps(args or {})], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} on {devices} devices failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# what one K-means iteration exchanges, and the projection


def iteration_exchange(d: int, ks: list[int], newton_passes: int) -> dict:
    """Bytes one K-means iteration of the sweep all-reduces (every run active), by kind: the
    weighted sums (sum K x D sums, sum K counts, S soft costs) once; per run and Newton pass the
    marginal, the Hessian's marginal and K x K matrix and the gain (K^2 + 2K + 1); per confirming
    Sinkhorn iteration four K-vectors (max and sum of the column log-sum-exp, for the update and for
    the error). Each run solves alone here (K doubles: no shared solves)."""
    total_k = sum(ks)
    sums = FLOAT * (total_k * d + total_k + len(ks))
    newton = sum(FLOAT * (k * k + 2 * k + 1) for k in ks) * newton_passes
    sinkhorn = sum(FLOAT * 4 * k for k in ks)
    calls = 1 + len(ks) * (newton_passes + 4)  # XLA combines each pass's reductions into one all-reduce
    return {"newton_passes": newton_passes, "weighted_sums": sums, "newton": newton, "sinkhorn": sinkhorn,
            "total": sums + newton + sinkhorn, "all_reduce_calls": calls}


def check_exchange(row: dict, n: int, d: int, ks: list[int]) -> dict:
    """What the compiled program's collectives hold: the weighted sums, every run's Hessian and
    K-vectors (`iteration_exchange` counts them), and nothing as long as a device's rows."""
    shapes = {tuple(dims) for c in row["collectives"] for dims in c["shapes"]}
    return {"weighted_sums": (sum(ks), d) in shapes, "hessians": all((k, k) in shapes for k in ks),
            "k_vectors": all((k,) in shapes for k in ks), "ops": sorted({c["op"] for c in row["collectives"]}),
            "largest_collective_bytes": max(c["bytes"] for c in row["collectives"]),
            "no_bank_rows": all(dim < n // row["devices"] for shape in shapes for dim in shape)}


def allreduce_seconds(nbytes: float, calls: int, devices: int) -> float:
    if devices == 1:
        return 0.0
    return 2 * (devices - 1) / devices * nbytes / H100["nvlink_bytes_per_s"] + calls * H100["all_reduce_latency_s"]


def kmeans_iteration_cost(n: int, d: int, ks: list[int], devices: int, stored: bool, newton_passes: int) -> dict:
    """FLOPs and HBM bytes of one K-means iteration per device. Online costs (the defaults at these
    sizes): every pass recomputes its costs (2 N K D), the soft assignment adds the weighted-sum
    matmul; OTT's online Sinkhorn iteration makes three passes (column update, row update, error).
    Stored costs: one cost matmul per iteration, the passes read them."""
    local, total_k = n / devices, sum(ks)
    cost_flops = 2 * local * total_k * d
    passes = newton_passes + 3  # per run: Newton passes, then one Sinkhorn iteration's three
    flops = 2 * cost_flops + (0 if stored else passes * cost_flops)
    rows = [max(4096, min(8 * k, (1 << 23) // k)) for k in ks]  # the Hessian's rows
    flops += sum(newton_passes * 2 * r / devices * k * k for r, k in zip(rows, ks))
    # HBM: each pass of a run reads its share of the bank (online) and writes and reads its costs.
    bank_reads = (0 if stored else passes * len(ks) + 1) * local * d * FLOAT
    cost_traffic = (passes + 2) * local * total_k * FLOAT * 2
    return {"flops": flops, "hbm_bytes": bank_reads + cost_traffic}


def kmeans_projection(setting: dict, rows: list[dict]) -> list[dict]:
    """Seconds per K-means iteration of the sweep on 1 and 8 H100s: max(matmul time, HBM time) +
    the all-reduces, at each matmul rate and assumed Newton passes per solve."""
    n, d, ks = setting["n"], setting["d"], setting["ks"]
    stored = {row["devices"]: row["stores_costs"] for row in rows}
    projection = []
    for devices in (1, 8):
        for passes in NEWTON_PASSES:
            cost = kmeans_iteration_cost(n, d, ks, devices, stored.get(devices, False), passes)
            exchange = iteration_exchange(d, ks, passes)
            network = allreduce_seconds(exchange["total"], exchange["all_reduce_calls"], devices)
            memory = cost["hbm_bytes"] / H100["hbm_bytes_per_s"]
            row = {"h100s": devices, "newton_passes": passes, "tflop_per_device": cost["flops"] / 1e12,
                   "hbm_gb_per_device": cost["hbm_bytes"] / 1e9, "all_reduce_mb": exchange["total"] / 1e6,
                   "all_reduce_s": network}
            for rate in ("fp32_matmul_flops", "fp32_exact_flops"):
                row[f"seconds_at_{rate}"] = max(cost["flops"] / H100[rate], memory) + network
            projection.append(row)
    return projection


def train_projection(train: dict) -> list[dict]:
    """Seconds per paper-config step on 1 and 8 H100s: the step's FLOPs spread over the devices
    (data parallel) at the fp32 (TF32) and bf16 rates, plus its exchange: the gradients' ring
    all-reduce (data parallel as it should be), or every collective the compiled program holds (an
    all-gather brings (n - 1) / n of its result to each device)."""
    flops, by_op = train["gflops"]["total"] * 1e9, train["bytes_by_op"]
    rows = []
    for devices in (1, 8):
        gathered = (devices - 1) / devices * by_op.get("all-gather", 0) / H100["nvlink_bytes_per_s"]
        exchange = {"gradients_only": allreduce_seconds(train["trainable_bytes"], 1, devices),
                    "as_compiled": 0.0 if devices == 1 else allreduce_seconds(
                        by_op.get("all-reduce", 0), len(train["collectives"]), devices) + gathered}
        for name, network in exchange.items():
            rows.append({"h100s": devices, "exchange": name, "tflop_per_device": flops / devices / 1e12,
                         "exchange_s": network, **{f"seconds_at_{rate}": flops / devices / H100[rate] + network
                                                   for rate in ("fp32_matmul_flops", "bf16_matmul_flops")}})
    return rows


def faiss_comparison() -> dict:
    """faiss's Lloyd iterations on its problem, their FLOPs and rate, against ours on the same
    problem: K = 20,000 is above newton_max_k, so Sinkhorn alone, S iterations per solve (online:
    three passes of 2 N K D each), plus the soft assignment's two matmuls."""
    n, d, k = FAISS["n"], FAISS["d"], FAISS["k"]
    lloyd = 2 * n * k * d  # the distance matmul of one iteration
    ours = {}
    for sinkhorn_iterations in (10, 100):
        flops = 2 * 2 * n * k * d + sinkhorn_iterations * 3 * 2 * n * k * d
        ours[f"sinkhorn_{sinkhorn_iterations}_per_solve"] = {
            "tflop_per_iteration": flops / 1e12,
            **{f"seconds_25_iterations_{devices}_h100_fp32": 25 * flops / devices / H100["fp32_matmul_flops"]
               for devices in (1, 8)}}
    return {**FAISS, "lloyd_tflop_per_iteration": lloyd / 1e12,
            "faiss_tflops_achieved": lloyd * FAISS["iterations"] / FAISS["seconds"] / 1e12,
            "lloyd_25_iterations_1_h100_fp32_s": lloyd * FAISS["iterations"] / H100["fp32_matmul_flops"],
            "ours": ours}


# ----------------------------------------------------------------------------------------------
# sections and main


def kmeans_section(setting: dict) -> dict:
    rows = []
    for devices in DEVICE_COUNTS:
        row = run_worker("kmeans", devices, setting)
        if devices > 1:
            row["checks"] = check_exchange(row, setting["n"], setting["d"], setting["ks"])
        rows.append(row)
        print(f"kmeans n={devices}: peak {row['memory']['peak'] / 2 ** 30:.2f} GiB/device, "
              f"{len(row['collectives'])} collectives, compiled in {row['compile_s']} s", flush=True)
    per_iteration = [iteration_exchange(setting["d"], setting["ks"], passes) for passes in NEWTON_PASSES]
    return {**setting, "programs": rows, "exchange_per_iteration": per_iteration,
            "projection": kmeans_projection(setting, rows)}


def measured_section() -> dict:
    """1 and 2 devices in turn, `rounds` times (the machine's load drifts); the ratio of the best
    median of each."""
    rows = [run_worker("measured", devices) for _ in range(MEASURED["rounds"]) for devices in (1, 2)]
    best = {devices: min(row["seconds_per_fit"] for row in rows if row["devices"] == devices) for devices in (1, 2)}
    return {**MEASURED, "rows": rows, "ratio_2_over_1": best[2] / best[1]}


def train_section() -> dict:
    train = run_worker("train", 8)
    return {**train, "projection": train_projection(train)}


def environment() -> dict:
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__, "cpu": platform.processor(),
            "cores": os.cpu_count(), "h100": H100}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="kmeans,train,measured")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--worker-args", default="{}")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.worker_args))))
        return 0
    out = args.out or RESULTS / ("scale_out_quick.json" if args.quick else "scale_out.json")
    results = json.loads(out.read_text()) if out.is_file() else {}
    sections = args.sections.split(",")
    if args.quick:
        sections = [s for s in sections if s != "train"]
    runners = {"kmeans": lambda: kmeans_section(QUICK if args.quick else FULL), "train": train_section,
               "measured": measured_section}
    for name in sections:
        began = time.perf_counter()
        results[name] = runners[name]()
        results[name]["section_s"] = round(time.perf_counter() - began, 1)
        results[name]["command"] = " ".join(["python", *sys.argv])
        results["environment"] = environment()
        results["faiss"] = faiss_comparison()
        out.write_text(json.dumps(results, indent=1))
        print(f"{name}: done in {results[name]['section_s']} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

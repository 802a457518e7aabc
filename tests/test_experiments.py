"""The experiment scripts: shard selection, the runner's skip/resume/aggregate-only, the statistics
over seeds (against numpy on hand-written result files), and a real experiment killed with SIGKILL and
restarted (tiny config, synthetic set, 2/1 split)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import ablation_decoder, ablation_mtl, cluster_sweep, protocol, table1
from experiments.runner import Experiment, Run, main, parse_shard, result_path, run_experiment, shard_runs
from nexvitad_jax.config import config_dict, load_config
from nexvitad_jax.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("pixel_auroc", "pixel_ap", "pro_iou", "aupro", "image_auroc")


# ----------------------------------------------------------------------------- shards


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0", "1/"):
        with pytest.raises(UserInputError, match="--shard"):
            parse_shard(bad)


def test_shards_split_the_runs_by_index_mod_n():
    runs = [Run(f"run{i}", {}, {}, lambda workdir, progress: {}) for i in range(7)]
    for count in (1, 2, 3, 7, 9):
        shards = [shard_runs(runs, index, count) for index in range(count)]
        for index, shard in enumerate(shards):
            assert [run.name for run in shard] == [f"run{i}" for i in range(7) if i % count == index]
        assert sorted(run.name for shard in shards for run in shard) == sorted(run.name for run in runs)


# ----------------------------------------------------------------------------- runner


def _counting_experiment(calls: list[str], config: dict | None = None) -> Experiment:
    """Five cheap runs whose result is their index squared; `calls` records every execution."""

    def execute(workdir: Path, progress: bool, index: int):
        calls.append(f"run{index}")
        workdir.mkdir(parents=True)
        return {"value": index**2}

    import functools

    runs = [Run(f"run{i}", {"index": i}, config or {"setting": 1}, functools.partial(execute, index=i))
            for i in range(5)]

    def aggregate(records):
        values = [record["result"]["value"] for record in records]
        return {"total": sum(values)}, f"total {sum(values)}\n"

    return Experiment("counting", "counting experiment", runs, aggregate)


def test_runner_skips_finished_runs_and_gathers_shards(tmp_path):
    calls: list[str] = []
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    partial = run_experiment(_counting_experiment(calls), hosts[0], shard=(0, 2), log=lambda m: None)
    assert calls == ["run0", "run2", "run4"]
    assert partial["finished"] == ["run0", "run2", "run4"] and partial["missing"] == ["run1", "run3"]
    assert partial["summary"] == {"total": 0 + 4 + 16}
    run_experiment(_counting_experiment(calls), hosts[1], shard=(1, 2), log=lambda m: None)
    assert calls == ["run0", "run2", "run4", "run1", "run3"]

    # Running shard 0 again executes nothing: every result exists.
    mtime = result_path(hosts[0], _counting_experiment([]).runs[0]).stat().st_mtime_ns
    run_experiment(_counting_experiment(calls), hosts[0], shard=(0, 2), log=lambda m: None)
    assert len(calls) == 5 and result_path(hosts[0], _counting_experiment([]).runs[0]).stat().st_mtime_ns == mtime

    # The gathering host copies every shard's runs/ and aggregates without running anything.
    gathered = tmp_path / "gathered"
    for host in hosts:
        shutil.copytree(host / "runs", gathered / "runs", dirs_exist_ok=True)
    aggregate = run_experiment(_counting_experiment(calls), gathered, aggregate_only=True, log=lambda m: None)
    assert len(calls) == 5
    assert aggregate["missing"] == [] and aggregate["summary"] == {"total": sum(i**2 for i in range(5))}
    assert json.loads((gathered / "counting.json").read_text()) == aggregate
    assert "5 of 5 runs finished." in (gathered / "counting.md").read_text()
    record = json.loads(result_path(gathered, _counting_experiment([]).runs[3]).read_text())
    assert record["params"] == {"index": 3} and record["config"] == {"setting": 1}  # results carry their config


def test_runner_refuses_results_of_another_config(tmp_path):
    run_experiment(_counting_experiment([]), tmp_path, log=lambda m: None)
    with pytest.raises(UserInputError, match=r"another run .*setting: saved 1, now 2"):
        run_experiment(_counting_experiment([], {"setting": 2}), tmp_path, log=lambda m: None)


# ----------------------------------------------------------------------------- statistics


def _args(**changes) -> argparse.Namespace:
    values = dict(config="tiny", overrides=[], data="synthetic", splits="11/1,10/2", seeds=3)
    return argparse.Namespace(**(values | changes))


def _write_main_job_results(out: Path, sweep: Experiment, rng: np.random.Generator) -> dict:
    """Hand-written result.json files with random metrics; one image AUROC undefined (None).
    Returns {(split, variant, method): {metric: [values by seed]}}."""
    expected: dict = {}
    for run in sweep.runs:
        mean = {}
        for method in run.params["methods"]:
            metrics = {name: float(rng.uniform(0.5, 1.0)) for name in METRICS}
            if run.params["seed"] == 1 and run.params["split"] == "10/2":
                metrics["image_auroc"] = None
            mean[method] = metrics
            key = (run.params["split"], run.params["variant"], method)
            for name in METRICS:
                expected.setdefault(key, {}).setdefault(name, []).append((run.params["seed"], metrics[name]))
        record = {"format": 1, "name": run.name, "key": run.key(), "params": run.params, "config": config_dict(run.config),
                  "result": {"mean": mean}}
        path = result_path(out, run)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
    return expected


@pytest.mark.parametrize("module, variants", [(table1, [""]), (ablation_decoder, ["with_pl", "without_pl"]),
                                              (ablation_mtl, ["per_class_heads", "shared_head"])])
def test_aggregation_matches_numpy(tmp_path, module, variants, capsys):
    sweep = module.build(_args())
    assert len(sweep.runs) == 2 * 3 * len(variants)
    expected = _write_main_job_results(tmp_path, sweep, np.random.default_rng(0))
    argv = ["--config", "tiny", "--out", str(tmp_path), "--splits", "11/1,10/2", "--seeds", "3",
            "--aggregate-only"]
    assert main(module.build, argv, module.__doc__, module.arguments) == 0
    aggregate = json.loads((tmp_path / f"{sweep.name}.json").read_text())
    assert aggregate["missing"] == []
    groups = aggregate["summary"]["groups"]
    assert len(groups) == len(expected)
    for group in groups:
        key = (group["split"], group.get("variant", ""), group["method"])
        for name in METRICS:
            seeds_values = [(s, v) for s, v in expected[key][name] if v is not None]
            values = np.array([v for _, v in seeds_values])
            stats = group["metrics"][name]
            assert stats["n"] == len(values)
            np.testing.assert_allclose(stats["mean"], values.mean(), rtol=1e-12)
            np.testing.assert_allclose(stats["std"], values.std(ddof=1), rtol=1e-12)
            assert stats["best"] == values.max() and stats["best_seed"] == seeds_values[int(values.argmax())][0]
    markdown = (tmp_path / f"{sweep.name}.md").read_text()
    best = next(g for g in groups if g["split"] == "11/1" and g["method"] == "memory_bank")["metrics"]
    assert f"{100 * best['pixel_auroc']['best']:.1f}" in markdown
    assert f"{100 * best['pixel_ap']['mean']:.1f} ± {100 * best['pixel_ap']['std']:.1f}" in markdown
    assert list(tmp_path.glob("*.png")) and "runs aggregated" in capsys.readouterr().err


def test_cluster_sweep_caps_k_at_the_bank_size_and_aggregates_per_k(tmp_path):
    layers = [{"patches": 1024, "effective_k": [5, 20]}, {"patches": 16, "effective_k": [5, 16]}]
    assert cluster_sweep.cap_lines([5, 20], layers) == ["K=20: layer 1 (16 patches) -> 16"]
    records = []
    rng = np.random.default_rng(1)
    for seed in (0, 1):
        mean = {str(k): {name: float(rng.uniform()) for name in METRICS} for k in (5, 20)}
        records.append({"params": {"split": "11/1", "seed": seed},
                        "result": {"ks": [5, 20], "mean": mean, "per_class": {"pill": {"layers": layers}}},
                        "config": config_dict(load_config("tiny"))})
    summary, markdown = cluster_sweep.aggregate(records)
    assert [(g["split"], g["k"]) for g in summary["groups"]] == [("11/1", 5), ("11/1", 20)]
    values = [r["result"]["mean"]["20"]["pro_iou"] for r in records]
    stats = summary["groups"][1]["metrics"]["pro_iou"]
    np.testing.assert_allclose([stats["mean"], stats["std"], stats["best"]],
                               [np.mean(values), np.std(values, ddof=1), np.max(values)], rtol=1e-12)
    assert "K=20: layer 1 (16 patches) -> 16" in markdown
    assert cluster_sweep.plot(summary, tmp_path)[0].is_file()


def test_protocol_arguments_are_checked():
    with pytest.raises(UserInputError, match="split"):
        protocol.splits_and_seeds(_args(splits="11-1"))
    with pytest.raises(UserInputError, match="--seeds"):
        protocol.splits_and_seeds(_args(seeds=0))
    with pytest.raises(UserInputError, match="--ks"):
        protocol.positive_integers("5,x", "--ks")
    # Variants change the config on top of --set; the seed is the run's.
    runs = ablation_decoder.build(_args(overrides=["train.lambda1=0.5"], seeds=1, splits="11/1")).runs
    assert [(r.config.train.lambda1, r.config.train.lambda2, r.config.seed) for r in runs] == [(0.5, 1.0, 0),
                                                                                               (0.0, 0.0, 0)]
    assert load_config("tiny").train.lambda1 == 1.0


# ----------------------------------------------------------------------------- a killed sweep


# Two tiny runs; phase 1 only and a one-layer memory bank halve the compilation, and the resume
# machinery is the same (training checkpoints, then per-class results).
TINY = ["--config", "tiny", "--splits", "2/1", "--seeds", "2", "--no-progress",
        *(f"--set={item}" for item in ("train.epochs=1", "train.phase1_epochs=1", "train.steps_per_epoch=2",
                                       "bank.layers=(3,)"))]


def _table1(out: Path, cache: Path, *options: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.table1", "--out", str(out), "--compile-cache",
                             str(cache), *TINY, *options], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="session")
def table1_reference(tmp_path_factory) -> tuple[Path, Path]:
    """(OUT, compilation cache) of the tiny table1 run uninterrupted, one run after the other, made
    once for every test (and xdist worker) that compares against it: the first to need it runs it
    under a file lock."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, above each worker's
    out, cache = shared / "table1_reference" / "whole", shared / "table1_reference" / "compile_cache"
    with open(shared / "table1_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "table1.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # an earlier failed attempt: start afresh
            whole = _table1(out, cache)
            assert whole.wait(timeout=600) == 0, whole.stderr.read()
    return out, cache


def _wait_for(predicate, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_sweep_resumes_from_its_finished_runs(tmp_path, table1_reference):
    """table1 (2 tiny runs) uninterrupted, then again SIGKILLed during its second run's training and
    restarted: the first run is not recomputed and the aggregate equals the uninterrupted one."""
    whole, cache = table1_reference  # the cache is shared: this sweep reuses the uninterrupted one's programs
    reference = json.loads((whole / "table1.json").read_text())

    out = tmp_path / "killed"
    first = out / "runs" / "split2-1_seed0" / "result.json"
    second = out / "runs" / "split2-1_seed1"
    process = _table1(out, cache)
    _wait_for(first.is_file, process, 300, "the first run finished")
    # Mid-run: the second run has trained at least one step (a checkpoint is being written).
    _wait_for(lambda: (second / "work" / "train" / "metrics.jsonl").is_file()
              and (second / "work" / "train" / "metrics.jsonl").read_text().strip(), process, 300,
              "the second run trained a step")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (second / "result.json").exists(), "the sweep was not killed mid-run"
    first_mtime, first_text = first.stat().st_mtime_ns, first.read_text()

    restarted = _table1(out, cache)
    _, log = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, log
    assert "split2-1_seed0: finished earlier (skipped)" in log
    assert first.stat().st_mtime_ns == first_mtime and first.read_text() == first_text
    resumed = json.loads((out / "table1.json").read_text())
    assert resumed["finished"] == reference["finished"] == ["split2-1_seed0", "split2-1_seed1"]
    assert resumed["summary"] == reference["summary"]
    assert (out / "table1.md").read_text() == (whole / "table1.md").read_text()

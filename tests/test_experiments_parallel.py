"""Several runs of an experiment at once, each on its own devices (`--devices-per-run`): the device
selection (GPU and CPU), the scheduling of subprocesses over device groups, and the tiny table1 on 2
fake CPU devices, one run per device, against the same experiment run one by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import table1
from experiments.runner import DeviceGroups, Run, device_environment, device_groups, main, result_path
from nexvitad_jax.errors import UserInputError
from tests.test_experiments import TINY, _table1, table1_reference  # noqa: F401 (a fixture)


def test_device_groups_cut_the_host_into_equal_groups():
    assert device_groups(8, 1) == [[i] for i in range(8)]
    assert device_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert device_groups(8, 3) == [[0, 1, 2], [3, 4, 5]]  # devices 6 and 7 stay idle
    assert device_groups(8, 8) == [list(range(8))]
    for bad in (0, 9):
        with pytest.raises(UserInputError, match=f"--devices-per-run {bad}: expected 1 to 8"):
            device_groups(8, bad)


def test_device_environment_on_gpus_and_cpus():
    base = {"PATH": "/bin", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"}
    assert device_environment([2, 3], "gpu", base) == {**base, "CUDA_VISIBLE_DEVICES": "2,3"}
    # A host already restricted to some GPUs: the group's indices are positions in that list.
    assert device_environment([1], "gpu", {"CUDA_VISIBLE_DEVICES": "4,6,7"})["CUDA_VISIBLE_DEVICES"] == "6"
    cpu = device_environment([4, 5, 6], "cpu", base)
    assert cpu["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["PATH"] == "/bin" and "CUDA_VISIBLE_DEVICES" not in cpu
    assert base["XLA_FLAGS"].endswith("=8")  # the caller's environment is left alone
    with pytest.raises(UserInputError, match="not tpu"):
        device_environment([0], "tpu", base)


# A stand-in for `python -m experiments.NAME`: writes the run's result (its devices and start and end
# times in it) after half a second, or fails for a run called "bad".
FAKE_RUN = """
import json, os, sys, time
from pathlib import Path
out, name = Path(sys.argv[1]), sys.argv[sys.argv.index("--only") + 1]
began = time.time()
time.sleep(0.5)
if name == "bad":
    print("something went wrong"); sys.exit(3)
path = out / "runs" / name / "result.json"
path.write_text(json.dumps({"xla_flags": os.environ["XLA_FLAGS"], "began": began, "ended": time.time()}))
"""


# JAX warns at every fork of a process whose backend is up (this test process's); the experiment
# that starts runs never brings its backend up before they end.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_device_groups_run_one_subprocess_per_group_at_a_time(tmp_path):
    runs = [Run(name, {}, {}, lambda workdir, progress: {}) for name in ("a", "b", "bad", "c")]
    groups = DeviceGroups([sys.executable, "-c", FAKE_RUN, str(tmp_path)], [[0], [1]], "cpu", dict(os.environ))
    messages = []
    failed = groups.run(tmp_path, [(run.name, run) for run in runs], messages.append)
    assert len(failed) == 1 and failed[0].startswith("bad (exit status 3")
    assert any("bad: FAILED (exit status 3)" in m and "something went wrong" in m for m in messages)
    records = {run.name: json.loads(result_path(tmp_path, run).read_text()) for run in runs if run.name != "bad"}
    assert all(r["xla_flags"].endswith("--xla_force_host_platform_device_count=1") for r in records.values())
    # Two groups: a and b ran at the same time, c only once one of them had finished.
    assert records["a"]["began"] < records["b"]["ended"] and records["b"]["began"] < records["a"]["ended"]
    assert records["c"]["began"] >= min(records["a"]["ended"], records["b"]["ended"])
    assert [m.split(":")[0] for m in messages if "running on cpu" in m] == ["a", "b", "bad", "c"]
    assert (tmp_path / "runs" / "bad" / "log.txt").read_text().strip() == "something went wrong"


def test_devices_per_run_needs_the_module_command(tmp_path, capsys):
    argv = ["--out", str(tmp_path), *TINY, "--devices-per-run", "1"]
    assert main(table1.build, argv, table1.__doc__, table1.arguments) == 2  # called in-process, not with -m
    assert "python -m experiments.NAME" in capsys.readouterr().err


def test_parallel_runs_equal_one_by_one(tmp_path, table1_reference):  # noqa: F811 (the fixture)
    """The tiny table1 (2 runs) with --devices-per-run 1 on 2 fake CPU devices: both runs at once,
    each in its own subprocess on one device; the aggregate equals the runs one by one."""
    whole, cache = table1_reference
    out = tmp_path / "parallel"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    began = time.perf_counter()
    process = _table1(out, cache, "--devices-per-run", "1", env=env)
    _, log = process.communicate(timeout=600)
    assert process.returncode == 0, log
    lines = [line for line in log.splitlines() if "split2-1_seed" in line]
    starts = [i for i, line in enumerate(lines) if "running on cpu device(s)" in line]
    assert len(starts) == 2 and "device(s) 0 " in lines[starts[0]] and "device(s) 1 " in lines[starts[1]]
    assert max(starts) < min(i for i, line in enumerate(lines) if ": done in" in line)  # both ran at once
    reference = json.loads((whole / "table1.json").read_text())
    parallel = json.loads((out / "table1.json").read_text())
    assert parallel["finished"] == reference["finished"] == ["split2-1_seed0", "split2-1_seed1"]
    assert parallel["summary"] == reference["summary"] and parallel["configs"] == reference["configs"]
    assert (out / "table1.md").read_text() == (whole / "table1.md").read_text()
    for name in reference["finished"]:
        run_log = (out / "runs" / name / "log.txt").read_text()
        assert f"runs {name}: 1 of 2 runs" in run_log  # the subprocess ran this run alone
    print(f"parallel table1: {time.perf_counter() - began:.1f} s")

    # Started again, every run is finished: nothing is started.
    again = _table1(out, cache, "--devices-per-run", "1", env=env)
    _, log = again.communicate(timeout=600)
    assert again.returncode == 0 and "running on" not in log and log.count("finished earlier (skipped)") == 2


# An experiment process that starts one run (a stand-in that writes its pid and sleeps), then waits.
PARENT = """
import os, sys
from pathlib import Path
from experiments.runner import DeviceGroups, Run
out = Path(sys.argv[1])
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
groups = DeviceGroups([sys.executable, "-c", child, str(out / "child.pid")], [[0]], "cpu", dict(os.environ))
groups.run(out, [("sleeper", Run("sleeper", {}, {}, None))], print)
"""


def test_runs_die_with_the_experiment(tmp_path):
    """SIGKILL the experiment: its run's subprocess goes too (it would otherwise race the restarted
    experiment in the same workdir)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=Path(__file__).parents[1],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file, deadline = tmp_path / "child.pid", time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert parent.poll() is None, parent.stderr.read()
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the run outlived the experiment"
        time.sleep(0.05)


def _state(pid: int) -> str:
    """A process's state letter (Z: a zombie, dead but not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return "Z"

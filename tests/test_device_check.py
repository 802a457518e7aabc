"""benchmarks/device_check.py --smoke: every section of the GPU check runs at tiny sizes on the CPU,
each writes its JSON with status ok (or a stated reason), and the summary exists, so the check
works the day a GPU is at hand."""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.device_check import SECTIONS  # noqa: E402


def test_device_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "device_check"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "device_check.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-3000:]
    combined = json.loads((out / "device_check.json").read_text())
    assert combined["smoke"] and list(combined["sections"]) == list(SECTIONS)
    for name in SECTIONS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["section"] == name
        # ok, or skipped with the reason said: --smoke runs one end-to-end job, not the paper config's.
        expected = "skipped" if name == "e2e_paper" else "ok"
        assert result["status"] == expected, (name, result.get("reason"), result.get("log_tail", "")[-1500:])
        assert result.get("headline" if expected == "ok" else "reason"), name
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | {'skipped' if name == 'e2e_paper' else 'ok'} |" in summary for name in SECTIONS)
    # The sections' own figures: what each measured at tiny size is there.
    environment = json.loads((out / "environment.json").read_text())
    assert environment["backend"] == "cpu" and environment["packages"]["jax"]
    weights = json.loads((out / "weights.json").read_text())
    assert [found["family"] for found in weights["backbones_found"]] == ["dinov2"]  # the planted one
    assert weights["conversions"][0]["returncode"] == 0 and "verify" in weights["conversions"][0]["verify"]
    parity = json.loads((out / "parity.json").read_text())
    assert all(row["fp32_within_1e-5"] for row in parity["rows"])
    train = json.loads((out / "train_step_torch.json").read_text())
    assert set(train["ratios"]) == {"float32"} and train["ratios"]["float32"]["jax_over_torch_eager"] > 0
    print(f"device_check --smoke: {seconds:.0f} s")


def test_device_check_cuts_a_section_over_its_deadline(tmp_path):
    out = tmp_path / "cut"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "device_check.py"), "--smoke",
                           "--out", str(out), "--sections", "kmeans", "--deadline", "kmeans=1"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "kmeans.json").read_text())
    assert result["status"] == "cut" and "deadline" in result["reason"]
    assert "| kmeans | cut |" in (out / "summary.md").read_text()

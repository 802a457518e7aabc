"""The paper's multi-task ablation (Fig. 7): one segmentation head per source class (MTL, the
default) vs one head shared by every source class (config.model.shared_source_head); the target heads
and pseudo-label heads are the same in both. The paper compares them with memory-bank inference;
the decoder path is measured too.

    python -m experiments.ablation_mtl --config tiny --out runs/ablation_mtl
    python -m experiments.ablation_mtl --config paper --data PATH/TO/mvtec \\
        --out runs/ablation_mtl-paper --seeds 5 --shard 0/2   # hosts 0 and 1, then --aggregate-only

Writes OUT/ablation_mtl.json, .md and OUT/ablation_mtl.png.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from experiments import protocol
from experiments.runner import main

VARIANTS = {"per_class_heads": {"model.shared_source_head": False}, "shared_head": {"model.shared_source_head": True}}
BY = ("split", "variant", "method")
aggregate = functools.partial(protocol.aggregate_runs, by=BY)


def plot(summary: dict, out: Path) -> list[Path]:
    memory_bank = [group for group in summary["groups"] if group["method"] == "memory_bank"]
    return [protocol.grouped_bars(memory_bank, ("variant",), out / "ablation_mtl.png",
                                  "Fig. 7: per-class source heads (MTL) vs one shared head, memory bank")]


build = protocol.main_job_experiment(
    "ablation_mtl", "NexViTAD ablation: per-class source heads (MTL) vs one shared head",
    VARIANTS, aggregate, plot)


arguments = protocol.protocol_arguments

if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))

"""The paper's decoder and pseudo-label ablations (Figs. 5-6): the memory bank vs the trained
decoder at inference, each with and without the pseudo-label head in training.

"Without the pseudo-label head" is lambda1 = lambda2 = 0 in eq. 8: the target cross-entropy against
the pseudo-labels and the consistency term vanish, so no pseudo-label reaches any loss and the
target domain supervises nothing; the encoder (adapters, projections) learns from the source classes
only. What that leaves, by how nexvitad_jax/train works:
- the target segmentation heads get zero gradients (Adam then makes zero updates), so they keep
  their initialization; only their BatchNorm running statistics follow the target images of
  phase 2. The decoder path without pseudo-labels is therefore an untrained head: the baseline
  that shows what the pseudo-labels teach the decoder.
- the pseudo-label heads still learn class-agnostic defect segmentation on the source ground truth
  (that source loss has a fixed weight of 1 in `LossWeights`, not a config field), and its gradient
  still reaches the interleaved F_3 adapters; its labels just go nowhere. The memory-bank path
  without pseudo-labels thus measures the encoder trained on source supervision alone.

    python -m experiments.ablation_decoder --config tiny --out runs/ablation_decoder
    python -m experiments.ablation_decoder --config paper --data PATH/TO/mvtec \\
        --out runs/ablation_decoder-paper --seeds 5 --shard 0/2   # hosts 0 and 1, then --aggregate-only

Writes OUT/ablation_decoder.json, .md, OUT/ablation_decoder_fig5.png (decoder vs memory bank, with
pseudo-labels) and OUT/ablation_decoder_fig6.png (all four combinations).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from experiments import protocol
from experiments.runner import main

VARIANTS = {"with_pl": {}, "without_pl": {"train.lambda1": 0.0, "train.lambda2": 0.0}}
BY = ("split", "variant", "method")
NOTE = ("with_pl: the full training (eq. 8, lambda1 = lambda2 = 1 unless --set says otherwise); without_pl: "
        "lambda1 = lambda2 = 0, no pseudo-label reaches a loss: the target heads stay at their initialization "
        "and the encoder learns from the source classes only (see the module docstring).\n\n")
aggregate = functools.partial(protocol.aggregate_runs, by=BY, note=NOTE)


def plot(summary: dict, out: Path) -> list[Path]:
    groups = summary["groups"]
    with_pl = [group for group in groups if group["variant"] == "with_pl"]
    return [protocol.grouped_bars(with_pl, ("method",), out / "ablation_decoder_fig5.png",
                                  "Fig. 5: decoder vs memory bank at inference"),
            protocol.grouped_bars(groups, ("method", "variant"), out / "ablation_decoder_fig6.png",
                                  "Fig. 6: with and without the pseudo-label head")]


build = protocol.main_job_experiment(
    "ablation_decoder", "NexViTAD ablation: decoder vs memory bank, with and without pseudo-labels",
    VARIANTS, aggregate, plot)


arguments = protocol.protocol_arguments

if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))

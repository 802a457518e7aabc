"""The peer methods the PatchEAD and INP-Former++ papers compare against, in the project's harness
(same splits, devices and evaluators): PatchEAD and PatchEAD+ few-shot and batch zero-shot, and
INP-Former and INP-Former++ few-shot.

- `scoring`: PatchEAD's eqs. 1-4 as jitted array functions;
- `encoder`: the frozen DINOv2 (patch tokens, class-token attention) they read;
- `alignment`: PatchEAD+'s foreground mask and prompt alignment;
- `patchead`: the detector (`PatchEAD`, `PatchEADOptions`);
- `inp_former`: INP-Former's modules and losses; `residual`: INP-Former++'s pseudo anomalies,
  residual segmentation head and its losses; `inp_training`: their few-shot training and scoring
  (`INPFormerDetector`);
- `methods`: every method by name (`METHODS`), as `python -m experiments.peers` runs them.
"""

from nexvitad_jax.peers.encoder import DinoPatchEncoder
from nexvitad_jax.peers.patchead import PatchEAD, PatchEADOptions

__all__ = ["DinoPatchEncoder", "PatchEAD", "PatchEADOptions"]

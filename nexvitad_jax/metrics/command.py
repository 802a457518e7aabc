"""`nexvitad evaluate`: the evaluators on anomaly maps saved as .npz.

    nexvitad evaluate maps.npz [--names aupro,pixel_auroc] [--fpr-limit 0.3] [--out metrics.json]

The .npz holds `scores` (N,H,W) and `masks` (N,H,W), and optionally `image_scores` (N,), `labels` (N,)
and `mask_known` (N,) (False for an anomalous image without a mask: the pixel metrics leave it out,
the image metrics keep it), as `nexvitad run` writes them in maps/.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics.evaluators import DEFAULT_FPR_LIMIT, EVALUATORS, evaluate


def load_maps(path: Path) -> dict[str, np.ndarray]:
    """Arrays `scores`, `masks` (and `image_scores` if present) from an .npz file."""
    expected = "expected an .npz (as `nexvitad run` writes in maps/) with 'scores' and 'masks'"
    if not path.is_file():
        raise UserInputError(f"{path}: no such file; {expected}")
    if not zipfile.is_zipfile(path):  # checked first: numpy would call any other file pickled data
        with open(path, "rb") as file:
            kind = ("a single array (an .npy file)" if file.read(6) == b"\x93NUMPY"
                    else "not a readable .npz file (not a zip archive of arrays)")
        raise UserInputError(f"{path}: {kind}; {expected}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError:  # allow_pickle=False refusing an object array
        raise UserInputError(f"{path}: holds object (pickled) arrays; {expected}, numeric arrays") from None
    except (OSError, zipfile.BadZipFile) as err:
        raise UserInputError(f"{path}: not a readable .npz file ({err}); {expected}") from None
    missing = [name for name in ("scores", "masks") if name not in arrays]
    if missing:
        raise UserInputError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    return arrays


def evaluate_arrays(arrays: dict[str, np.ndarray], names, **options) -> dict[str, float]:
    """`evaluate` on load_maps' arrays: the pixel metrics on the images whose mask is known, the
    image metrics on every image (labels from `labels` when saved, else from the masks)."""
    names = list(EVALUATORS) if names is None else names
    known = np.asarray(arrays.get("mask_known", np.ones(len(arrays["scores"]), bool)), bool)
    image_names = [name for name in names if name.startswith("image_")]
    pixel_names = [name for name in names if name not in image_names]
    if not known.all():
        print(f"nexvitad evaluate: {int((~known).sum())} anomalous images have no mask; the pixel metrics "
              "leave them out", file=sys.stderr)
    results = {}
    if pixel_names:
        results.update(evaluate(arrays["scores"][known], arrays["masks"][known], pixel_names, **options))
    if image_names:
        results.update(evaluate(arrays["scores"], arrays["masks"], image_names, image_scores=arrays.get("image_scores"),
                                image_labels=arrays.get("labels"), **options))
    return {name: results[name] for name in names}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nexvitad evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("maps", type=Path, help=".npz with scores (N,H,W), masks (N,H,W)[, image_scores (N,)]")
    parser.add_argument("--names", default=None,
                        help=f"comma-separated evaluators (default all): {','.join(EVALUATORS)}")
    parser.add_argument("--fpr-limit", type=float, default=DEFAULT_FPR_LIMIT,
                        help=f"the false-positive-rate limit AUPRO integrates to (default {DEFAULT_FPR_LIMIT})")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "jax"],
                        help="where the metrics are computed: numpy, jax, or auto (NumPy on CPU, JAX on an accelerator; default)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    arrays = load_maps(args.maps)
    names = None if args.names is None else [n.strip() for n in args.names.split(",") if n.strip()]
    results = evaluate_arrays(arrays, names, fpr_limit=args.fpr_limit, backend=args.backend)
    for name, value in results.items():
        print(f"{name:<22} {value:.6f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"maps": str(args.maps), "fpr_limit": args.fpr_limit,
                                        "metrics": results}, indent=1) + "\n")
    return 0

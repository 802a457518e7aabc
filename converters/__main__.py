"""Convert PyTorch Hiera/DINOv2 checkpoints to Flax (orbax + config.json).

    python -m converters {hiera,dinov2} --source HUB_ID|DIR|FILE.pth --out DIR [--variant NAME] [--verify]
    nexvitad convert ...     # the same command (registered in pyproject.toml)
"""

from __future__ import annotations

import argparse
import sys

from converters.common import CONVERTERS, convert_checkpoint, set_offline_defaults
from nexvitad_jax.errors import UserInputError


def build_parser(prog: str = "python -m converters") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a PyTorch Hiera / DINOv2 checkpoint to an orbax checkpoint + config.json "
                    "readable by nexvitad_jax.models.load_backbone.")
    parser.add_argument("family", choices=sorted(CONVERTERS), help="the backbone family of the checkpoint")
    parser.add_argument("--source", required=True,
                        help="hub id (e.g. facebook/dinov2-small; needs network), a variant name (its hub id), "
                             "a local transformers directory (config.json + model.safetensors or "
                             "pytorch_model.bin), or an official .pth checkpoint")
    parser.add_argument("--out", required=True, help="output directory (DIR/params + DIR/config.json)")
    parser.add_argument("--variant", help="expected variant (e.g. small, huge); checked against the checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
    parser.add_argument("--verify", action="store_true",
                        help="run the Flax and the transformers model on a random batch and fail above "
                             "max|flax-torch|/max|torch| = 1e-5 (5e-2 for bfloat16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m converters` (argv None: the command line) or `nexvitad convert` (the `nexvitad`
    dispatcher passes the arguments after its subcommand), each under its own name in --help."""
    args = build_parser("python -m converters" if argv is None else "nexvitad convert").parse_args(argv)
    set_offline_defaults()
    try:
        convert_checkpoint(args.family, args.source, args.out, variant=args.variant, dtype=args.dtype,
                           run_verify=args.verify)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

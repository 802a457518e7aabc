"""`nexvitad data`: inspect, prepare (decode once into the cache) and look at a dataset.

    nexvitad data info synthetic
    nexvitad data prepare /data/mvtec_anomaly_detection.tar.xz --image-size 224
    nexvitad data sheet synthetic --out sheet.png --classes pill,wood
"""

from __future__ import annotations

import argparse

from nexvitad_jax.data import open_dataset
from nexvitad_jax.data.synthetic import save_contact_sheet
from nexvitad_jax.errors import UserInputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexvitad data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("info", "list classes and image counts"),
        ("prepare", "decode every class into the cache"),
        ("sheet", "save a contact sheet PNG (image | mask)"),
    ):
        command = commands.add_parser(name, help=help_)
        command.add_argument("spec", help="'synthetic', an MVTec folder or the official .tar.xz")
        command.add_argument("--image-size", type=int, default=224)
        command.add_argument("--seed", type=int, default=0, help="synthetic set seed")
        command.add_argument("--cache-dir", default=None, help="default: $NEXVITAD_CACHE")
        command.add_argument("--classes", default="", help="comma-separated (default: all)")
        if name == "sheet":
            command.add_argument("--out", required=True, help="output PNG")
            command.add_argument("--per-class", type=int, default=6)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    kwargs = {"cache_dir": args.cache_dir} if args.spec != "synthetic" else {}
    dataset = open_dataset(args.spec, image_size=args.image_size, seed=args.seed, **kwargs)
    classes = [c for c in args.classes.split(",") if c] or dataset.classes
    unknown = sorted(set(classes) - set(dataset.classes))
    if unknown:
        raise UserInputError(f"--classes {unknown}: not in {args.spec} (it holds {dataset.classes})")
    if args.action == "sheet":
        save_contact_sheet(dataset, args.out, classes=classes, per_class=args.per_class)
        print(f"wrote {args.out}")
        return 0
    from tqdm.auto import tqdm

    for category in tqdm(classes, desc="classes", disable=args.action == "info"):
        train, test = dataset.load(category, "train"), dataset.load(category, "test")
        types = sorted(set(test.defect_types) - {"good"})
        print(f"{category:12s} train {len(train):4d}  test {len(test):4d} "
              f"({int(test.labels.sum())} defective: {', '.join(types)})")
    return 0

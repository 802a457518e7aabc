"""`nexvitad data`: inspect, prepare (decode once into the cache) and look at a dataset.

    nexvitad data info synthetic
    nexvitad data info /data/visa                 # names the layout, classes, counts per split and type
    nexvitad data info /data/mvtec_loco_anomaly_detection.tar.xz   # any layout's archive (extracted once)
    nexvitad data prepare /data/mvtec_anomaly_detection.tar.xz --image-size 224
    nexvitad data info /data/mvtec --target-data mydata.yaml
    nexvitad data sheet synthetic --out sheet.png --classes pill,wood
"""

from __future__ import annotations

import argparse
from collections import Counter

from nexvitad_jax.data import CrossDataset, open_dataset
from nexvitad_jax.data.synthetic import save_contact_sheet
from nexvitad_jax.errors import UserInputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexvitad data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("info", "name the layout, list classes and image counts per split and defect type"),
        ("prepare", "decode every class into the cache"),
        ("sheet", "save a contact sheet PNG (image | mask)"),
    ):
        command = commands.add_parser(name, help=help_)
        command.add_argument("spec", help="'synthetic', a dataset folder, an archive of one (.tar, .tar.gz, "
                                          ".tar.xz, .zip) or a folder-spec .yaml/.json")
        command.add_argument("--target-data", default=None, help="a second dataset (cross-dataset runs)")
        command.add_argument("--image-size", type=int, default=224, help="side of the decoded square images (default 224)")
        command.add_argument("--seed", type=int, default=0, help="synthetic set seed")
        command.add_argument("--cache-dir", default=None, help="default: $NEXVITAD_CACHE")
        command.add_argument("--classes", default="", help="comma-separated (default: all)")
        if name == "sheet":
            command.add_argument("--out", required=True, help="output PNG")
            command.add_argument("--per-class", type=int, default=6, help="images per class on the sheet (default 6)")
    return parser


def _counted(counts: Counter) -> str:
    """"12 (good 4, crack 8)": normal images first, then the defect types."""
    types = sorted(counts, key=lambda t: (t != "good", t))
    return f"{sum(counts.values())} ({', '.join(f'{t} {counts[t]}' for t in types)})"


def describe(dataset, spec: str, classes: list[str]) -> list[str]:
    """What `nexvitad data info` prints: the layout, notes, then a line per class."""
    lines = [f"{spec}: {dataset.layout}, {len(classes)} classes: {', '.join(classes)}"]
    lines += [f"note: {note}" for note in dataset.notes]
    width = max(len(c) for c in classes)
    for category in classes:
        counts = dataset.counts(category)
        role = f" [{dataset.role_of(category)}]" if isinstance(dataset, CrossDataset) else ""
        lines.append(f"{category:{width}s}{role}  " + "  ".join(
            f"{split} {_counted(counts[split])}" for split in dataset.splits if split in counts))
    return lines


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    kwargs = {"cache_dir": args.cache_dir} if args.spec != "synthetic" else {}
    dataset = open_dataset(args.spec, image_size=args.image_size, seed=args.seed,
                           target_spec=args.target_data, **kwargs)
    classes = [c for c in args.classes.split(",") if c] or dataset.classes
    unknown = sorted(set(classes) - set(dataset.classes))
    if unknown:
        raise UserInputError(f"--classes {unknown}: not in {args.spec} (it holds {dataset.classes})")
    if args.action == "sheet":
        save_contact_sheet(dataset, args.out, classes=classes, per_class=args.per_class)
        print(f"wrote {args.out}")
        return 0
    if args.action == "prepare":
        from tqdm.auto import tqdm

        for category in tqdm(classes, desc="classes"):
            for split in dataset.counts(category):
                dataset.load(category, split)
    print("\n".join(describe(dataset, args.spec, classes)))
    return 0

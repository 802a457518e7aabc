"""TFDS builders: MVTec AD as `mvtec_ad`, every other layout as `industrial_ad`, array_record files
readable with `tfds.data_source`.

No TensorFlow needed (building and reading): features are fixed-shape numpy tensors, and every
example goes through the same decode path as `open_dataset` (`decode.decode_example`).

    builder = prepare(SRC, "hazelnut", DATA_DIR)              # mvtec_ad/hazelnut
    test = tfds.data_source("mvtec_ad/hazelnut", split="test", data_dir=DATA_DIR)
    builder = prepare("/data/visa", "candle", DATA_DIR, image_size=256)   # industrial_ad/visa_candle_256

SRC (the manual dir) is anything `open_dataset` reads: an MVTec AD folder or its official `.tar.xz`
archive (whole or per category, or a folder holding it), a MPDD, MVTec 3D-AD, MVTec LOCO, VisA or
BTAD folder or an archive of one (.tar, .tar.gz, .tar.xz, .zip...; extracted once into DATA_DIR's
cache), or a folder-spec file. Splits are the class's (train, test, and validation where the
layout has one). Prepared data lives under DATA_DIR keyed by builder, config (layout, category,
image size) and version; a second `prepare` decodes nothing. A DATA_DIR holds one dataset per
layout (two folder specs with the same class name would share a config).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nexvitad_jax.data import open_dataset, open_folder
from nexvitad_jax.data.archive import is_archive_name, open_archive
from nexvitad_jax.data.decode import CategoryArrays, decode_example
from nexvitad_jax.data.folder_spec import SPEC_SUFFIXES
from nexvitad_jax.data.mvtec import MVTEC_CLASSES
from nexvitad_jax.errors import UserInputError

_ARCHIVE_NAMES = ("mvtec_anomaly_detection.tar.xz",)


@dataclasses.dataclass
class MVTecConfig(tfds.core.BuilderConfig):
    """One category at one square image size."""

    category: str = "bottle"
    image_size: int = 224
    source: str = ""  # a file in the manual dir (archive, folder spec); "" reads the manual dir itself


def _find_source(manual_dir: Path, category: str) -> Path:
    """The folder, archive or spec file inside manual_dir that holds `category`."""
    manual_dir = Path(manual_dir)
    if manual_dir.is_file() or (manual_dir / category).is_dir() or manual_dir.name == category:
        return manual_dir
    for name in (f"{category}.tar.xz", *_ARCHIVE_NAMES):
        if (manual_dir / name).is_file():
            return manual_dir / name
    archives = sorted(p for p in manual_dir.iterdir() if p.is_file() and is_archive_name(p.name))
    if len(archives) == 1:
        return archives[0]
    raise UserInputError(
        f"{manual_dir}: no category {category!r} found; expected a dataset folder holding {category}/ "
        f"(e.g. {category}/train/good), {category}.tar.xz, mvtec_anomaly_detection.tar.xz or a single dataset "
        "archive (.tar, .tar.gz, .tar.xz, .zip) in the manual dir, or a folder-spec file"
    )


def open_source(manual_dir, category: str, image_size: int, cache_dir):
    """The dataset of the manual dir, checked to hold `category` (an MVTec AD archive is listed, not
    decoded; another archive is extracted once)."""
    source = _find_source(Path(manual_dir), category)
    if source.is_file() and source.suffix.lower() not in SPEC_SUFFIXES:
        dataset = open_archive(source, image_size=image_size, cache_dir=cache_dir, open_folder=open_folder,
                               decode_on_scan=False)
    else:
        dataset = open_dataset(source, image_size=image_size, cache_dir=cache_dir)
    if category not in dataset.classes:
        raise UserInputError(f"{source}: no category {category!r}; it holds {dataset.classes}")
    return dataset


class MVTecAD(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one config per category (`mvtec_ad/hazelnut`), train/test splits."""

    name = "mvtec_ad"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "mask_known (False for a defect image without a mask) and "
                     "order (the reader's order within a split)."}
    BUILDER_CONFIGS = [MVTecConfig(name=c, category=c) for c in MVTEC_CLASSES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and "
        "point manual_dir at the extracted folder or at the .tar.xz archive."
    )
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "mask": tfds.features.Tensor(shape=(size, size), dtype=np.bool_),
                "mask_known": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "order": tfds.features.Tensor(shape=(), dtype=np.int64),
                "label": tfds.features.ClassLabel(names=["good", "defect"]),
                "defect_type": tfds.features.Text(),
                "path": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        # The same reader as open_dataset (its .npz cache is not used here; an archive's listing and
        # extracted copy are, under DATA_DIR/archives, not in this version's folder).
        source = Path(dl_manager.manual_dir) / config.source
        dataset = open_source(source, config.category, config.image_size, Path(self.data_dir_root))
        read = dataset.reader(config.category)
        return {split: self._generate_examples(dataset.entries(config.category, split), read)
                for split in dataset.counts(config.category)}

    def _generate_examples(self, entries, read):
        size = self.builder_config.image_size
        for order, entry in enumerate(entries):
            image, mask = decode_example(entry, read, size)
            yield entry.image_key, {
                "order": order,
                "image": image,
                "mask": mask,
                "mask_known": entry.mask_known,
                "label": int(entry.defect_type != "good"),
                "defect_type": entry.defect_type,
                "path": entry.display_path,
            }


class IndustrialAD(MVTecAD):
    """Every other layout (MPDD, MVTec 3D-AD, MVTec LOCO, VisA, BTAD, folder specs): configs named
    LAYOUT_CATEGORY_SIZE (`industrial_ad/visa_candle_224`), made by `prepare`."""

    name = "industrial_ad"
    BUILDER_CONFIGS = []
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at the dataset folder (or folder-spec file)."
    HOMEPAGE = None


def prepare(manual_dir, category: str, data_dir, *, image_size: int = 224) -> MVTecAD:
    """Build (once) the config of one category and size of any layout; returns the builder.

    TFDS wants a folder as its manual dir: a file (an archive, a folder spec) is passed as its
    folder plus the config's `source`."""
    manual_dir = Path(manual_dir)
    if not manual_dir.exists():
        raise UserInputError(f"{manual_dir}: no such dataset folder, archive or folder spec")
    dataset = open_source(manual_dir, category, image_size, data_dir)  # a clear error before TFDS starts
    file = manual_dir.name if manual_dir.is_file() else ""
    builder_class, name = MVTecAD, f"{category}_{image_size}"
    if dataset.slug != "mvtec":
        builder_class, name = IndustrialAD, re.sub(r"[^A-Za-z0-9_]", "_", f"{dataset.slug}_{category}_{image_size}")
    elif category in MVTEC_CLASSES and image_size == 224 and not file:
        name = category  # a registered config: `mvtec_ad/hazelnut`
    config = name if name in builder_class.builder_configs else MVTecConfig(
        name=name, category=category, image_size=image_size, source=file)
    builder = builder_class(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir.parent if file else manual_dir)),
    )
    return builder


def to_category_arrays(source) -> CategoryArrays:
    """A `tfds.data_source` split -> CategoryArrays, in the reader's order (as `Dataset.load`)."""
    records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["order"]))
    return CategoryArrays(
        images=np.stack([r["image"] for r in records]),
        masks=np.stack([r["mask"] for r in records]).astype(bool),
        labels=np.asarray([r["label"] for r in records], np.int32),
        defect_types=[_text(r["defect_type"]) for r in records],
        paths=[_text(r["path"]) for r in records],
        mask_known=np.asarray([r["mask_known"] for r in records], bool),
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""TFDS builder `mvtec_ad`: MVTec AD as array_record, readable with `tfds.data_source`.

No TensorFlow needed (building and reading): features are fixed-shape numpy tensors, and every
example goes through the same decode path as `open_dataset` (`mvtec.decode_example`).

    builder = MVTecAD(config="hazelnut", data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=SRC))
    test = tfds.data_source("mvtec_ad/hazelnut", split="test", data_dir=DATA_DIR)

SRC (the manual dir) is an MVTec AD folder, the official `.tar.xz` archive (whole or
per-category), or a folder holding that archive. Prepared data lives under DATA_DIR, keyed by
config (category + image size) and version; a second `download_and_prepare` decodes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nexvitad_jax.data.mvtec import MVTEC_CLASSES, CategoryArrays, MVTecDataset, decode_example
from nexvitad_jax.errors import UserInputError

_ARCHIVE_NAMES = ("mvtec_anomaly_detection.tar.xz",)


@dataclasses.dataclass
class MVTecConfig(tfds.core.BuilderConfig):
    """One MVTec category at one square image size."""

    category: str = "bottle"
    image_size: int = 224


def _find_source(manual_dir: Path, category: str) -> Path:
    """The folder or archive inside manual_dir that holds `category`."""
    manual_dir = Path(manual_dir)
    if manual_dir.is_file():
        return manual_dir
    if (manual_dir / category).is_dir():
        return manual_dir
    for name in (f"{category}.tar.xz", *_ARCHIVE_NAMES):
        if (manual_dir / name).is_file():
            return manual_dir / name
    archives = sorted(manual_dir.glob("*.tar.xz"))
    if len(archives) == 1:
        return archives[0]
    raise UserInputError(
        f"{manual_dir}: no MVTec category {category!r} found; expected {category}/train/good, "
        f"{category}.tar.xz or mvtec_anomaly_detection.tar.xz in the manual dir"
    )


class MVTecAD(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one config per category (`mvtec_ad/hazelnut`), train/test splits."""

    name = "mvtec_ad"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [MVTecConfig(name=c, category=c) for c in MVTEC_CLASSES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and "
        "point manual_dir at the extracted folder or at the .tar.xz archive."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "mask": tfds.features.Tensor(shape=(size, size), dtype=np.bool_),
                "label": tfds.features.ClassLabel(names=["good", "defect"]),
                "defect_type": tfds.features.Text(),
                "path": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        source = _find_source(dl_manager.manual_dir, config.category)
        # The same reader as open_dataset (its .npz cache is not used here).
        dataset = MVTecDataset(
            source, image_size=config.image_size, cache_dir=self.data_dir, decode_on_scan=False
        )
        read = dataset.reader(config.category)
        return {
            split: self._generate_examples(dataset.entries(config.category, split), read)
            for split in ("train", "test")
        }

    def _generate_examples(self, entries, read):
        size = self.builder_config.image_size
        for entry in entries:
            image, mask = decode_example(entry, read, size)
            yield entry.image_key, {
                "image": image,
                "mask": mask,
                "label": int(entry.defect_type != "good"),
                "defect_type": entry.defect_type,
                "path": entry.display_path,
            }


def prepare(manual_dir, category: str, data_dir, *, image_size: int = 224) -> MVTecAD:
    """Build (once) the `mvtec_ad` config for one category and size; returns the builder."""
    if not Path(manual_dir).exists():
        raise UserInputError(f"{manual_dir}: no such MVTec folder or archive")
    _find_source(Path(manual_dir), category)  # a clear error before TFDS starts a build
    if category in MVTEC_CLASSES and image_size == 224:
        config = category  # a registered config: `mvtec_ad/hazelnut`
    else:
        config = MVTecConfig(name=f"{category}_{image_size}", category=category,
                             image_size=image_size)
    builder = MVTecAD(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
    )
    return builder


def to_category_arrays(source) -> CategoryArrays:
    """A `tfds.data_source` split -> CategoryArrays (order as stored, sorted by path)."""
    records = sorted((source[i] for i in range(len(source))), key=lambda r: _text(r["path"]))
    return CategoryArrays(
        images=np.stack([r["image"] for r in records]),
        masks=np.stack([r["mask"] for r in records]).astype(bool),
        labels=np.asarray([r["label"] for r in records], np.int32),
        defect_types=[_text(r["defect_type"]) for r in records],
        paths=[_text(r["path"]) for r in records],
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

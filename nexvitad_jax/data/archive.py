"""Dataset archives of any layout: .tar (plain, .gz, .bz2, .xz) and .zip.

An MVTec AD (or MPDD) tar archive is read in place by `MVTecDataset`: its first pass lists the
members and decodes every category on the way (the official `.tar.xz` is never extracted). Every
other archive (VisA, MVTec 3D-AD, MVTec LOCO, BTAD, an MVTec-layout zip, or a tar the first pass
found not to be MVTec AD) is extracted once into the cache, under a folder keyed by the archive's
identity (resolved path, size, mtime), and read as that folder by its layout's reader (a compressed
tar of another layout is thus read twice when first opened: the listing pass, then the extraction):

    CACHE/archives/NAME-KEY/members.json   the archive's file members (listing it again reads nothing)
    CACHE/archives/NAME-KEY/files/         the extracted images and CSV files (written to files.tmpPID
                                           first, then renamed: a reader never sees half a tree)

A member with an absolute path or `..` is never extracted. Images are shown (`CategoryArrays.paths`,
errors about a wrong or mixed layout, a missing mask, a corrupt image) as the archive's members,
`ARCHIVE::MEMBER`, as for the MVTec AD archive read in place, wherever the cache is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from nexvitad_jax.data.cached import default_cache_dir
from nexvitad_jax.data.decode import IMAGE_SUFFIXES
from nexvitad_jax.data.mvtec import MVTecDataset, looks_like_tar, tar_members
from nexvitad_jax.data.tree import TREE_LAYOUTS
from nexvitad_jax.data.visa import SPLIT_FILE as VISA_SPLIT_FILE
from nexvitad_jax.errors import UserInputError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".txz", ".zip")
EXTRACTED_SUFFIXES = (*IMAGE_SUFFIXES, ".csv")  # what the readers read (VisA: split and annotation CSVs)


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_kind(path: Path) -> str:
    """"tar" or "zip" by the file's bytes (not its name); anything else is the user's mistake."""
    if looks_like_tar(path):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    raise UserInputError(f"{path}: not a dataset archive (expected .tar, .tar.gz, .tar.bz2, .tar.xz or .zip of a "
                         "dataset folder), a dataset folder or a folder-spec .yaml/.json")


def _safe(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and ".." not in parts and ":" not in parts[0]


def _folders(names: Iterable[str]) -> set[str]:
    """Every folder that holds a member ("" is the archive's root)."""
    folders = set()
    for name in names:
        folders.update(p.as_posix() for p in PurePosixPath(name).parents)
    return {"" if f == "." else f for f in folders}


def is_mvtec_listing(names: Iterable[str]) -> bool:
    """Whether every class folder of the members (a folder holding train/ or test/) is in the MVTec
    AD layout (the tree layouts' signatures, as for a folder) and there is no VisA split file."""
    names = list(names)
    if any(name == VISA_SPLIT_FILE or name.endswith("/" + VISA_SPLIT_FILE) for name in names):
        return False
    folders = _folders(names)

    def join(folder: str, rel: str) -> str:
        return f"{folder}/{rel}" if folder else rel

    classes = [f for f in folders if join(f, "train") in folders or join(f, "test") in folders]
    layouts = {next((layout.slug for layout in TREE_LAYOUTS if any(join(f, s) in folders for s in layout.signature)),
                    None) for f in classes}
    return layouts == {"mvtec"}


def dataset_root(folder: Path) -> Path:
    """The folder the dataset starts at: down through single folders (`mvtec_loco_anomaly_detection/`)
    until a folder holds several, a class's splits, a VisA split file, or a class folder."""
    while True:
        subfolders = [d for d in folder.iterdir() if d.is_dir()]
        marks = ("train", "test", "split_csv")
        if len(subfolders) != 1 or any((folder / m).is_dir() for m in marks) or any(
                (subfolders[0] / s).is_dir() for s in ("train", "test")):
            return folder
        folder = subfolders[0]


class Archive:
    """One archive file: its kind, its cache folder (keyed by its identity), listing and extraction."""

    def __init__(self, path: Path, cache_dir=None):
        self.path = Path(path).expanduser().resolve()
        self.kind = archive_kind(self.path)
        stat = self.path.stat()
        identity = f"{self.path}|{stat.st_size}|{stat.st_mtime_ns}"
        key = hashlib.sha1(identity.encode()).hexdigest()[:16]
        self.folder = Path(cache_dir or default_cache_dir()) / "archives" / f"{self.path.name}-{key}"
        self.files = self.folder / "files"

    # -- listing
    def cached_names(self) -> list[str] | None:
        listing = self.folder / "members.json"
        return json.loads(listing.read_text()) if listing.is_file() else None

    def save_names(self, names: list[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"members.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(names))
        os.replace(tmp, self.folder / "members.json")

    def list_zip(self) -> list[str]:
        try:
            with zipfile.ZipFile(self.path) as archive:
                return [info.filename for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as err:
            raise UserInputError(f"{self.path}: unreadable archive ({err})") from None

    # -- extraction
    def _members(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the wanted members, in the archive's order (one sequential pass)."""
        try:
            if self.kind == "zip":
                with zipfile.ZipFile(self.path) as archive:
                    for name in sorted(wanted):
                        yield name, archive.read(name)
                return
            with tar_members(self.path, f"reading {self.path.name}") as (archive, members):
                for member in members:
                    if member.isfile() and member.name in wanted:
                        yield member.name, archive.extractfile(member).read()
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
            raise UserInputError(f"{self.path}: unreadable archive ({err})") from None

    def extract(self, names: list[str]) -> Path:
        """The extracted folder (once: a second call, or another process's, finds it done)."""
        from tqdm.auto import tqdm

        if self.files.is_dir():
            return self.files
        wanted = {n for n in names if _safe(n) and n.lower().endswith(EXTRACTED_SUFFIXES)}
        if not wanted:
            raise UserInputError(f"{self.path}: holds no images (expected a dataset folder's images inside)")
        tmp = self.folder / f"files.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with tqdm(total=len(wanted), desc=f"extracting {self.path.name}", unit="file",
                  disable=len(wanted) < 64) as bar:
            for name, data in self._members(wanted):
                target = tmp / name
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                except OSError as err:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise UserInputError(f"{self.path}: could not extract it into {self.folder} ({err}); free "
                                         "space there or set NEXVITAD_CACHE to another folder") from None
                bar.update()
        try:
            os.replace(tmp, self.files)
        except OSError:  # another process finished first: keep its tree
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.files.is_dir():
                raise
        return self.files

    def members_named(self, message: str) -> str:
        """A message or path about the extracted tree, with its paths as the archive's members."""
        return message.replace(f"{self.files}/", f"{self.path}::").replace(str(self.files), str(self.path))

    def show_members(self, dataset) -> None:
        """The dataset's entries shown as the archive's members (the keys still read the extracted files)."""
        for splits in dataset.index.values():
            for split, entries in splits.items():
                splits[split] = [dataclasses.replace(
                    e, display_path=self.members_named(e.display_path),
                    mask_display_paths=tuple(map(self.members_named, e.mask_display_paths))) for e in entries]


def open_archive(path: Path, *, image_size: int, cache_dir, open_folder: Callable, decode_on_scan: bool = True):
    """The dataset of an archive: an MVTec AD tar in place, any other archive extracted (see above).
    `open_folder(path, image_size, cache_dir)` opens an extracted folder by its layout."""
    archive = Archive(path, cache_dir)
    names, mvtec = archive.cached_names(), None
    if names is None:
        if archive.kind == "tar":  # the one pass: lists, and decodes the categories if MVTec AD
            mvtec = MVTecDataset(archive.path, image_size=image_size, cache_dir=cache_dir,
                                 decode_on_scan=decode_on_scan)
            names = mvtec.member_names()
        else:
            names = archive.list_zip()
        archive.save_names(names)
    if archive.kind == "tar" and is_mvtec_listing(names):
        return mvtec or MVTecDataset(archive.path, image_size=image_size, cache_dir=cache_dir,
                                     decode_on_scan=decode_on_scan)
    if mvtec is not None:  # its first pass found another layout: drop what it kept
        shutil.rmtree(mvtec.cache_dir, ignore_errors=True)
    root = dataset_root(archive.extract(names))
    try:
        dataset = open_folder(root, image_size, cache_dir)
    except UserInputError as err:
        raise UserInputError(archive.members_named(str(err))) from None
    archive.show_members(dataset)
    dataset.notes = [f"read from {archive.path}, extracted once into {archive.files}", *dataset.notes]
    return dataset

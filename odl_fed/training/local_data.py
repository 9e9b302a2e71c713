"""A board's own images: a folder with one sub-folder per class (torchvision's ImageFolder layout),
decoded once and kept on the board's disk as uint8 tensors.

::

    DIR/
      cat/  0001.jpg  0002.png  holiday/0003.jpeg ...
      dog/  ...

``python -m odl_fed.client --data DIR`` names the folder; a job with ``dataset: local`` names the
classes (``classes: [cat, dog, bird]``), and a class's label is its place in that list, so every
board labels alike whichever classes it happens to hold. Images are ``.jpg``/``.jpeg``/``.png`` of
any size and mode (greyscale, palette, RGBA, 16-bit), turned upright by their EXIF orientation,
converted to RGB and resized to the job's ``image-size`` (as the named datasets of
:mod:`odl_fed.training.data` are); :func:`~odl_fed.training.data.batches` normalises them.

Flower starts a fresh ClientApp process for every message, so the folder is decoded once, by the
first round that needs it, into ``CACHE/<folder>-<content>.pt`` (:func:`decoded_dir`; keyed by the
folder's path, the job's classes and image size, and every image's path, size and modification
time), and every later process memory-maps that file. A changed folder is decoded again and
replaces its older file.

What a board's folder may hold, and what becomes of it:

- a class folder the job does not name: skipped, with a warning;
- a file that is not a ``.jpg``/``.jpeg``/``.png`` (or one outside any class folder): skipped, with a
  warning (hidden files such as ``.DS_Store`` silently);
- an image that cannot be read: skipped, with a warning, when others can;
- no usable image at all (no such folder, no class folder, empty ones, none readable):
  :class:`LocalDataError`, one message naming the folder and what is wrong.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from odl_fed.config.names import LOCAL_DATASET
from odl_fed.training.data import ImageData, data_root

__all__ = ["IMAGE_SUFFIXES", "LocalDataError", "FolderScan", "LocalData", "scan_folder", "check_folder", "load_local",
           "decoded_dir", "decode_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1  # a cache file written by another version is decoded again
SHOWN = 5  # file names a warning lists before "and N more"
log = logging.getLogger("odl_fed.training.local_data")


class LocalDataError(ValueError):
    """A board's image folder that nothing can train on; the message names the folder and why."""


def decoded_dir() -> Path:
    """Where decoded folders are kept: ``$ODL_FED_DATA/.decoded`` (``--data-root``), else
    ``~/.cache/odl-fed/datasets/.decoded``."""
    return data_root() / ".decoded"


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, by listing only (nothing decoded)."""

    root: Path
    images: dict[str, tuple[Path, ...]]  # class folder -> its image files (sorted, sub-folders included)
    strays: tuple[Path, ...]  # files that are not images by their suffix, or outside any class folder

    @property
    def count(self) -> int:
        return sum(map(len, self.images.values()))


def _listing(paths, root: Path) -> str:
    names = [str(p.relative_to(root)) for p in paths]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def scan_folder(root: str | Path) -> FolderScan:
    """List ``root``'s class folders and their images; :class:`LocalDataError` when it has none."""
    root = Path(root)
    if not root.exists():
        raise LocalDataError(f"{root} does not exist (expected a folder with one sub-folder of images per class)")
    if not root.is_dir():
        raise LocalDataError(f"{root} is not a folder (expected one sub-folder of images per class)")
    images: dict[str, tuple[Path, ...]] = {}
    strays: list[Path] = []
    try:
        entries = sorted(root.iterdir())
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                strays.append(entry)
                continue
            files = sorted(p for p in entry.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(entry).parts))
            images[entry.name] = tuple(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
            strays += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    except PermissionError as error:
        raise LocalDataError(f"{root}: cannot list {error.filename} (permission denied)") from None
    scan = FolderScan(root, images, tuple(strays))
    if not images:
        raise LocalDataError(f"{root} has no class sub-folder (expected {root}/<class>/<image>.jpg|.png)")
    if scan.count == 0:
        raise LocalDataError(f"{root}: its class folders {sorted(images)} hold no .jpg/.jpeg/.png image")
    return scan


def check_folder(root: str | Path) -> tuple[FolderScan, list[str]]:
    """A board's folder checked before it joins (its job's classes and image size are not known yet):
    its scan and warnings (stray files, images whose header cannot be read); :class:`LocalDataError`
    when it holds no image that opens. Reads each image's header only."""
    from PIL import Image, UnidentifiedImageError

    scan = scan_folder(root)
    broken = []
    for path in (p for files in scan.images.values() for p in files):
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            broken.append(path)
    if len(broken) == scan.count:
        raise LocalDataError(f"{scan.root}: none of its {scan.count} image(s) can be read "
                             f"({_listing(broken, scan.root)})")
    warnings = []
    if scan.strays:
        warnings.append(f"{scan.root}: {len(scan.strays)} file(s) skipped, not .jpg/.jpeg/.png images in a class "
                        f"folder: {_listing(scan.strays, scan.root)}")
    if broken:
        warnings.append(f"{scan.root}: {len(broken)} image(s) cannot be read and will be skipped: "
                        f"{_listing(broken, scan.root)}")
    return scan, warnings


@dataclass(frozen=True)
class LocalData:
    """A board's images as :class:`~odl_fed.training.data.ImageData`, what was skipped and why, and
    whether this call decoded them (False: read from the cache)."""

    data: ImageData
    warnings: tuple[str, ...]
    summary: str
    decoded: bool
    cache_file: Path | None


def load_local(root: str | Path, *, classes, image_size: int, cache_dir: str | Path | None = None) -> LocalData:
    """The images of ``root``'s folders named in ``classes`` (label = place in ``classes``), at
    ``image_size`` x ``image_size``, RGB uint8; decoded once into ``cache_dir`` (default
    :func:`decoded_dir`), then read from there. Raises :class:`LocalDataError` when none can train."""
    classes = tuple(classes)
    scan = scan_folder(root)
    root = scan.root
    warnings = []
    unknown = sorted(set(scan.images) - set(classes))
    if unknown:
        warnings.append(f"{root}: class folder(s) {unknown} are not among the job's classes {list(classes)}: "
                        f"skipped ({sum(len(scan.images[c]) for c in unknown)} image(s))")
    if scan.strays:
        warnings.append(f"{root}: {len(scan.strays)} file(s) skipped, not .jpg/.jpeg/.png images in a class folder: "
                        f"{_listing(scan.strays, root)}")
    files = [(label, path) for label, name in enumerate(classes) for path in scan.images.get(name, ())]
    if not files:
        raise LocalDataError(f"{root}: no image in any of the job's classes {list(classes)} (its class folders: "
                             f"{sorted(scan.images)}, {scan.count} image(s) in all)")
    cache = Path(cache_dir) if cache_dir is not None else decoded_dir()
    key, stamp = _cache_key(root, classes, image_size, files)
    images, labels, unreadable, decoded, path = _cached(root, classes, image_size, files, cache, key, stamp)
    if unreadable:
        warnings.append(f"{root}: {len(unreadable)} image(s) could not be read and were skipped: "
                        + "; ".join(unreadable[:SHOWN]) + (f" and {len(unreadable) - SHOWN} more"
                                                            if len(unreadable) > SHOWN else ""))
    if labels.numel() == 0:
        raise LocalDataError(f"{root}: none of its {len(files)} image(s) in the job's classes could be read "
                             f"({unreadable[0]})")
    held = sorted({classes[i] for i in labels.unique().tolist()}, key=classes.index)
    missing = [c for c in classes if c not in held]
    summary = (f"{root}: {labels.numel()} image(s) of {len(held)} of the job's {len(classes)} classes"
               + (f" (none of {missing})" if missing else "")
               + (f", decoded once into {path}" if decoded and path else f", read from {path}" if path else ""))
    return LocalData(ImageData(LOCAL_DATASET, images, labels, len(classes)), tuple(warnings), summary, decoded, path)


def _cache_key(root: Path, classes: tuple[str, ...], image_size: int, files) -> tuple[str, str]:
    """(the folder's part of the cache file's name, the content's part)."""
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    listing = []
    for label, path in files:
        stat = path.stat()
        listing.append((label, str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    what = json.dumps({"version": CACHE_VERSION, "classes": classes, "size": image_size, "files": listing})
    return where, hashlib.sha256(what.encode()).hexdigest()[:20]


def _cached(root: Path, classes, image_size: int, files, cache: Path, key: str, stamp: str):
    """(images, labels, unreadable, decoded here?, cache file): from the cache file (memory-mapped, and
    kept in this process: a simulated actor runs many rounds), or decoded now and written there
    atomically; a process decoding the same folder meanwhile is waited for, then read."""
    path = cache / f"{key}-{stamp}.pt"
    try:
        return (*_read(str(path)), False, path)
    except _NotCached:
        pass
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f".{key}.lock", "a")
    except OSError as error:  # a read-only disk: decoded in every process
        log.warning("cannot keep decoded images in %s (%s): decoding %s in memory", cache, error, root)
        return (*_decode_all(files, image_size, root), True, None)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return (*_read(str(path)), False, path)
        except _NotCached:
            pass
        log.warning("decoding %d image(s) of %s once, at %d px (kept in %s)", len(files), root, image_size, cache)
        images, labels, unreadable = _decode_all(files, image_size, root)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            torch.save({"version": CACHE_VERSION, "images": images, "labels": labels, "unreadable": unreadable}, tmp)
            tmp.replace(path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log.warning("could not keep decoded images in %s (%s); they are decoded again next time", cache, error)
            return images, labels, unreadable, True, None
        for older in cache.glob(f"{key}-*.pt"):  # the same folder's earlier contents
            if older != path:
                older.unlink(missing_ok=True)
        return (*_read(str(path)), True, path)  # memory-mapped, as the next process will have it


class _NotCached(Exception):
    pass


@functools.lru_cache(maxsize=4)  # exceptions are not cached: a file made later is read then
def _read(path: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        saved = torch.load(path, mmap=True, weights_only=True)
        if saved.get("version") != CACHE_VERSION:
            raise _NotCached(path)
        return saved["images"], saved["labels"], list(saved["unreadable"])
    except (OSError, RuntimeError, KeyError, AttributeError, ValueError, EOFError):
        raise _NotCached(path) from None  # not made yet, or damaged: decoded again


def _decode_all(files, image_size: int, root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    labels, unreadable, kept = [], [], 0
    for label, path in files:
        try:
            images[kept] = decode_image(path, image_size)
        except (OSError, ValueError, SyntaxError, MemoryError) as error:
            why = " ".join(str(error).replace(f" '{path}'", "").split()) or type(error).__name__
            unreadable.append(f"{path.relative_to(root)} ({why})")
            continue
        labels.append(label)
        kept += 1
    return torch.from_numpy(images[:kept].copy()), torch.tensor(labels, dtype=torch.int64), unreadable


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """One image file as ``(3, S, S)`` uint8 RGB: upright (EXIF), any mode converted, resized."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (image_size, image_size))  # a large photo decoded at a reduced scale
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit or float greyscale
            values = np.asarray(image, dtype=np.float32)
            top = float(values.max()) if values.size else 0.0
            image = Image.fromarray(np.clip(values * (255.0 / top if top > 0 else 0.0), 0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            flat = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent parts as white
            image = Image.alpha_composite(flat, image)
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)

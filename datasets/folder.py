"""Loading a real site's own images: class folders or a CSV manifest.

A site administrator points ``data.path`` at what they already have. Two layouts are accepted:

* **A, class folders**: ``<folder>/<class_name>/*.png|jpg|jpeg|bmp``.
* **B, CSV manifest**: a ``.csv`` file (or ``<folder>/manifest.csv``) with the header
  ``path,label[,task][,domain]``; ``path`` is relative to the CSV's folder (or absolute),
  ``label`` a class name, ``task`` a non-negative integer and ``domain`` any name (e.g. the
  scanner or production line).

Every problem is a :class:`DataError` naming the exact file, row or column and the fix, because
the person reading it is a site administrator, not the developer. Manifest rows are numbered as
the file's lines, so the header is row 1 and the first image is row 2 (as in a spreadsheet).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .dataset import DEFAULT_DOMAIN, DataError, LabeledImages

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "task", "domain")
LAYOUTS = (
    "accepted layouts: (A) class folders <folder>/<class_name>/<image>.png|.jpg|.jpeg|.bmp, or "
    "(B) a CSV manifest (a .csv path, or <folder>/manifest.csv) with header "
    "path,label[,task][,domain]"
)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_GRAY_MODES = ("1", "L", "LA", "La")


def load_folder(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    class_names: Sequence[str] | None = None,
    domain_names: Sequence[str] | None = None,
) -> LabeledImages:
    """Load a class-folder tree or CSV manifest into :class:`LabeledImages`.

    ``image_size`` defaults to the first image's size (its larger side if it is not square);
    other sizes are resized to it, so a site can mix scanners. ``channels`` defaults to 1 when
    every image is grayscale and 3 otherwise. Pass ``class_names`` (the federation's agreed
    label order) so label indices match every other site even when this site lacks a class;
    ``domain_names`` does the same for a manifest's ``domain`` column (examples without a
    domain column get the first domain).
    """
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB); got {channels!r}")
    if image_size is not None and (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 1
    ):
        raise DataError(f"data.image_size must be a positive integer; got {image_size!r}")
    image_size = None if image_size is None else int(image_size)
    names = _check_names("class_names", class_names)
    domains = _check_names("domain_names", domain_names)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist; fix data.path or create it ({LAYOUTS})")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(
                f"data path {root} is a file but not a .csv manifest; point data.path at the "
                f"image folder or the manifest ({LAYOUTS})"
            )
        return _from_manifest(root, image_size, channels, names, domains)
    if (root / MANIFEST_NAME).is_file():
        return _from_manifest(root / MANIFEST_NAME, image_size, channels, names, domains)
    return _from_class_folders(root, image_size, channels, names, domains)


def _check_names(field: str, given: Sequence[str] | None) -> tuple[str, ...] | None:
    if given is None:
        return None
    if isinstance(given, str):
        raise DataError(f"{field} must be a list of names, not the string {given!r}")
    names = tuple(str(c) for c in given)
    if not names:
        raise DataError(f"{field} is empty; list every name, or leave it unset")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError(f"{field} lists {dupes} more than once; each name must appear once")
    return names


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _from_class_folders(
    root: Path,
    image_size: int | None,
    channels: int | None,
    class_names: tuple[str, ...] | None,
    domain_names: tuple[str, ...] | None,
) -> LabeledImages:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = (
            f" ({len(loose)} image(s) lie directly in it: move each into a subfolder named after "
            "its class, or add a manifest.csv)"
            if loose
            else ""
        )
        raise DataError(f"{root} has no class subfolders{hint}; {LAYOUTS}")
    if class_names is None:
        class_names = tuple(d.name for d in subdirs)
    else:
        extra = [d.name for d in subdirs if d.name not in class_names]
        if extra:
            raise DataError(
                f"{root} has class folder(s) {extra} that are not in class_names "
                f"{list(class_names)}; add them to class_names or move those folders out"
            )
    files: list[Path] = []
    labels: list[int] = []
    for d in subdirs:
        for f in sorted(p for p in d.iterdir() if _is_image(p)):
            files.append(f)
            labels.append(class_names.index(d.name))
    if not files:
        raise DataError(
            f"{root} contains no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders "
            f"{[d.name for d in subdirs]}; {LAYOUTS}"
        )
    x = _load_images(files, image_size, channels)
    return LabeledImages(
        x=x,
        y=np.asarray(labels, dtype=np.int64),
        domain=np.zeros(len(files), dtype=np.int64),
        class_names=class_names,
        domain_names=domain_names or (DEFAULT_DOMAIN,),
    )


def _from_manifest(
    manifest: Path,
    image_size: int | None,
    channels: int | None,
    class_names: tuple[str, ...] | None,
    domain_names: tuple[str, ...] | None,
) -> LabeledImages:
    header_help = "the first line must be the header path,label[,task][,domain]"
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"manifest {manifest} is empty; {header_help}")
            columns = [(c or "").strip().lower() for c in reader.fieldnames]
            reader.fieldnames = columns
            for required in ("path", "label"):
                if required not in columns:
                    raise DataError(
                        f"manifest {manifest} has no '{required}' column (header: "
                        f"{','.join(columns)}); {header_help}"
                    )
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {manifest}: {e}; save it as UTF-8 CSV") from e
    if not rows:
        raise DataError(f"manifest {manifest} has a header but no rows; add one row per image")
    has_task, has_domain = "task" in columns, "domain" in columns

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        return value.strip() if isinstance(value, str) else ""

    files: list[Path] = []
    labels: list[str] = []
    tasks: list[int] = []
    domains: list[str] = []
    for row_no, row in rows:
        where = f"manifest {manifest}, row {row_no}"
        label = cell(row, "label")
        if class_names is not None and label not in class_names:
            raise DataError(
                f"{where}: label {label!r} is not a known class; known labels: "
                f"{', '.join(class_names)}. Fix the label or add it to class_names."
            )
        if not label:
            raise DataError(f"{where}: the label is empty; give every image its class name")
        rel = cell(row, "path")
        if not rel:
            raise DataError(f"{where}: the path is empty; give the image file path")
        image = Path(rel).expanduser()
        if not image.is_absolute():
            image = manifest.parent / image
        if not image.is_file():
            raise DataError(
                f"{where}: image {image} does not exist; fix the path (relative to "
                f"{manifest.parent}) or remove the row"
            )
        if has_task:
            raw = cell(row, "task")
            try:
                task = int(raw)
            except ValueError:
                task = -1
            if task < 0:
                raise DataError(
                    f"{where}: task {raw!r} is not a non-negative integer; number tasks "
                    "0, 1, 2, ... in the order they arrive"
                )
            tasks.append(task)
        if has_domain:
            dom = cell(row, "domain")
            if not dom:
                raise DataError(f"{where}: the domain is empty; fill it in or drop the column")
            if domain_names is not None and dom not in domain_names:
                raise DataError(
                    f"{where}: domain {dom!r} is not a known domain; known domains: "
                    f"{', '.join(domain_names)}. Fix the domain or add it to domain_names."
                )
            domains.append(dom)
        files.append(image)
        labels.append(label)

    if class_names is None:
        class_names = tuple(sorted(set(labels)))
    if domain_names is None:
        domain_names = tuple(sorted(set(domains))) if has_domain else (DEFAULT_DOMAIN,)
    x = _load_images(files, image_size, channels)
    return LabeledImages(
        x=x,
        y=np.asarray([class_names.index(lab) for lab in labels], dtype=np.int64),
        domain=(
            np.asarray([domain_names.index(d) for d in domains], dtype=np.int64)
            if has_domain
            else np.zeros(len(files), dtype=np.int64)
        ),
        class_names=class_names,
        domain_names=domain_names,
        task=np.asarray(tasks, dtype=np.int64) if has_task else None,
    )


def _open_image(path: Path) -> tuple[Image.Image, bool]:
    """Decode one image to 8-bit L or RGB; also report whether it is grayscale."""
    try:
        with Image.open(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"cannot read image {path}: {e}. The file is corrupt or not an image; remove it or "
            "replace it with a valid PNG, JPEG or BMP."
        ) from e
    if img.mode in _HIGH_DEPTH_MODES:
        # 16-bit / float scans (common in medical imaging) would clip to white in convert("L").
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and a.max() > 255:
            a = a / (257.0 if a.max() <= 65535 else a.max() / 255.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L"), True
    if img.mode in _GRAY_MODES:
        return img.convert("L"), True
    rgb = img.convert("RGB")
    a = np.asarray(rgb)
    gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    return rgb, gray


def _load_images(files: list[Path], image_size: int | None, channels: int | None) -> np.ndarray:
    """Decode, resize and stack images as float32 ``(N, C, S, S)`` in ``[0, 1]``."""
    images: list[Image.Image] = []
    all_gray = True
    size = image_size
    for path in files:
        img, gray = _open_image(path)
        all_gray = all_gray and gray
        if size is None:
            size = max(img.size)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        images.append(img)
    if channels is None:
        channels = 1 if all_gray else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in images]
    x = np.stack(arrays).astype(np.float32) / 255.0
    return x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2).copy()

"""Site data: built-in datasets, folder / manifest loading, and partitioning across sites."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedcl.datasets as data_pkg
from fedcl.config.errors import FedclError
from fedcl.datasets import (
    BUILTIN_DATASETS,
    DataError,
    LabeledImages,
    load_builtin,
    load_folder,
    partition_indices,
    to_tensor_dataset,
    train_test_split_indices,
)

MATERIALS = ("steel", "wood", "concrete", "fabric")
LIGHTINGS = ("bright", "dim")


# ---------------------------------------------------------------------------------------------
# the common type
# ---------------------------------------------------------------------------------------------


def _tiny(n: int = 6) -> LabeledImages:
    rng = np.random.default_rng(0)
    return LabeledImages(
        x=rng.random((n, 1, 4, 4)),
        y=np.arange(n) % 3,
        domain=np.arange(n) % 2,
        class_names=("a", "b", "c"),
        domain_names=("d0", "d1"),
        task=np.arange(n) // 2,
    )


def test_exports_and_error_type() -> None:
    assert set(data_pkg.__all__) == {
        "BUILTIN_DATASETS",
        "DataError",
        "LabeledImages",
        "load_builtin",
        "load_folder",
        "partition_indices",
        "to_tensor_dataset",
        "train_test_split_indices",
    }
    assert issubclass(DataError, ValueError) and issubclass(DataError, FedclError)
    assert BUILTIN_DATASETS == ("digits", "defects", "captioned-defects", "captioned-digits")


def test_labeled_images_coerces_subsets_and_validates() -> None:
    d = _tiny()
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64 and d.task.dtype == np.int64
    assert (len(d), d.num_classes, d.in_channels, d.image_size) == (6, 3, 1, 4)
    sub = d.subset(np.array([5, 0]))
    assert (
        sub.y.tolist() == [2, 0] and sub.task.tolist() == [2, 0] and sub.domain.tolist() == [1, 0]
    )
    assert sub.class_names == d.class_names and sub.domain_names == d.domain_names
    np.testing.assert_array_equal(sub.x[0], d.x[5])
    assert len(d.subset(d.y == 1)) == 2
    tds = to_tensor_dataset(d)
    xb, yb = tds[3]
    assert xb.shape == (1, 4, 4) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    with pytest.raises(DataError, match="labels must lie"):
        LabeledImages(np.zeros((2, 1, 4, 4)), np.array([0, 3]), np.zeros(2), ("a", "b"), ("d",))
    with pytest.raises(DataError, match="square"):
        LabeledImages(np.zeros((2, 1, 4, 5)), np.zeros(2), np.zeros(2), ("a",), ("d",))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        LabeledImages(np.full((2, 1, 4, 4), 2.0), np.zeros(2), np.zeros(2), ("a",), ("d",))


# ---------------------------------------------------------------------------------------------
# built-in datasets
# ---------------------------------------------------------------------------------------------


def test_digits_is_the_real_sklearn_set() -> None:
    d = load_builtin("digits")
    assert len(d) == 1797 and d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32
    assert d.x.min() == 0.0 and d.x.max() == 1.0
    # 17 gray levels (0..16) scaled by 1/16.
    assert np.allclose(np.unique(d.x) * 16, np.arange(17))
    assert d.class_names == tuple(str(i) for i in range(10)) and d.num_classes == 10
    assert np.bincount(d.y).tolist()[:3] == [178, 182, 177]
    assert d.domain_names == ("default",) and not d.domain.any() and d.task is None
    np.testing.assert_array_equal(load_builtin("digits").x, d.x)


def test_defects_default_shape_balance_domains() -> None:
    t0 = time.perf_counter()
    d = load_builtin("defects")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10  # ~0.3 s on an idle core; generous for loaded CI machines
    assert d.x.shape == (8 * 4 * 60, 1, 32, 32) and d.x.dtype == np.float32
    assert d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert d.class_names == ("none", "scratch", "spot", "crack")
    assert d.domain_names == tuple(f"{m}/{li}" for m in MATERIALS for li in LIGHTINGS)
    counts = np.zeros((8, 4), dtype=int)
    np.add.at(counts, (d.domain, d.y), 1)
    assert (counts == 60).all()
    # Lighting matters: dim domains are clearly darker than bright ones of the same material.
    means = [d.x[d.domain == k].mean() for k in range(8)]
    assert all(means[2 * m] > means[2 * m + 1] + 0.15 for m in range(4))


def test_defects_deterministic_by_seed_and_consistent_under_restriction() -> None:
    a = load_builtin("defects", seed=3, n_per_class_per_domain=5)
    b = load_builtin("defects", seed=3, n_per_class_per_domain=5)
    c = load_builtin("defects", seed=4, n_per_class_per_domain=5)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert np.abs(a.x - c.x).mean() > 0.02
    only = load_builtin(
        "defects", seed=3, n_per_class_per_domain=5, materials=["wood"], lightings="dim"
    )
    assert only.domain_names == ("wood/dim",) and len(only) == 20
    np.testing.assert_array_equal(only.x, a.x[a.domain == a.domain_names.index("wood/dim")])


def test_defects_options_size_and_channels() -> None:
    d = load_builtin("defects", n_per_class_per_domain=2, image_size=16, channels=3)
    assert d.x.shape == (8 * 4 * 2, 3, 16, 16) and d.in_channels == 3 and d.image_size == 16
    wood = d.x[d.domain == d.domain_names.index("wood/bright")]
    assert wood[:, 0].mean() > wood[:, 2].mean() + 0.1  # wood is tinted brown


def test_builtin_errors_name_the_problem() -> None:
    with pytest.raises(DataError, match=r"'mnist'.*digits, defects"):
        load_builtin("mnist")
    with pytest.raises(DataError, match="only the option .domains."):
        load_builtin("digits", image_size=16)
    with pytest.raises(DataError, match=r"\['colour'\].*n_per_class_per_domain"):
        load_builtin("defects", colour=True)
    with pytest.raises(DataError, match=r"plastic.*steel, wood, concrete, fabric"):
        load_builtin("defects", materials=["steel", "plastic"])
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_builtin("defects", channels=2)
    with pytest.raises(DataError, match="image_size"):
        load_builtin("defects", image_size=4)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Single-threaded torch: faster for tiny models and immune to an oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_defects_is_learnable_by_a_tiny_cnn() -> None:
    """Far above chance (0.25) after a few seconds of training: the classes are separable."""
    d = load_builtin("defects", seed=1, n_per_class_per_domain=40, materials=["steel", "fabric"])
    train, test = train_test_split_indices(len(d), test_fraction=0.25, seed=0, stratify=d.y)
    # Per-image standardisation removes the lighting offset so 15 epochs are enough.
    x = d.x - d.x.mean(axis=(1, 2, 3), keepdims=True)
    x = torch.from_numpy(x / x.std(axis=(1, 2, 3), keepdims=True))
    y = torch.from_numpy(d.y)
    with _one_thread():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 5, padding=2),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveMaxPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 4),
        )
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        order = torch.Generator().manual_seed(0)
        train_t = torch.from_numpy(train)
        for _ in range(15):
            for batch in train_t[torch.randperm(len(train_t), generator=order)].split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.5, acc


# ---------------------------------------------------------------------------------------------
# folder layout A: class subfolders
# ---------------------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_class_folders_round_trip_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected, labels = [], []
    for cls in ["cat", "ant", "bee"]:
        for k in range(3):
            img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            _write(tmp_path / cls / f"img{k}.png", img)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    for ci, cls in enumerate(["ant", "bee", "cat"]):
        for k in range(3):
            expected.append(np.asarray(Image.open(tmp_path / cls / f"img{k}.png")))
            labels.append(ci)
    d = load_folder(tmp_path)
    assert d.class_names == ("ant", "bee", "cat")
    assert d.x.shape == (9, 1, 8, 8) and d.in_channels == 1
    assert d.y.tolist() == labels and d.task is None and d.domain_names == ("default",)
    assert np.abs(d.x[:, 0] - np.stack(expected) / 255.0).max() <= 1 / 255 + 1e-6


def test_class_folders_round_trip_rgb_and_given_class_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = {c: rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for c in ("red", "blue")}
    for c, img in imgs.items():
        _write(tmp_path / c / "x.png", img)
    d = load_folder(tmp_path, class_names=["red", "blue", "green"])
    assert d.class_names == ("red", "blue", "green") and d.num_classes == 3
    assert d.in_channels == 3 and d.x.shape == (2, 3, 6, 6)
    # Folders are read in sorted order (blue, red); labels follow the given class order.
    assert d.y.tolist() == [1, 0]
    assert np.abs(d.x[1].transpose(1, 2, 0) - imgs["red"] / 255.0).max() <= 1 / 255 + 1e-6


def test_class_folders_resize_and_channel_conversion(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "0.png", np.full((8, 8), 200, dtype=np.uint8))
    _write(tmp_path / "b" / "1.png", np.full((16, 16), 100, dtype=np.uint8))
    gray_as_rgb = np.repeat(np.full((8, 8, 1), 50, dtype=np.uint8), 3, axis=2)
    _write(tmp_path / "b" / "2.png", gray_as_rgb)
    d = load_folder(tmp_path)  # size of the first image; gray RGB still counts as grayscale
    assert d.x.shape == (3, 1, 8, 8)
    assert np.allclose(d.x[:, 0, 0, 0], [200 / 255, 100 / 255, 50 / 255], atol=1 / 255)
    d3 = load_folder(tmp_path, image_size=4, channels=3)
    assert d3.x.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(d3.x[:, 0], d3.x[:, 2])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    img = np.array([[0, 65535], [32896, 65535]], dtype=np.uint16)
    _write(tmp_path / "scan" / "a.png", img)
    d = load_folder(tmp_path)
    assert np.allclose(d.x[0, 0], [[0.0, 1.0], [128 / 255, 1.0]], atol=1 / 255)


# ---------------------------------------------------------------------------------------------
# folder layout B: CSV manifest
# ---------------------------------------------------------------------------------------------


def _manifest_site(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    for k in range(4):
        _write(tmp_path / "imgs" / f"{k}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    absolute = tmp_path / "imgs" / "3.png"
    (tmp_path / "manifest.csv").write_text(
        "path, label ,task,domain\n"
        "imgs/0.png,benign,0,scanner_b\n"
        "imgs/1.png,malignant,0,scanner_a\n"
        "imgs/2.png,benign,1,scanner_a\n"
        f"{absolute},malignant,1,scanner_b\n"
    )
    return tmp_path


def test_manifest_with_tasks_and_domains(tmp_path: Path) -> None:
    root = _manifest_site(tmp_path)
    for source in (root, root / "manifest.csv"):
        d = load_folder(source)
        assert d.class_names == ("benign", "malignant")
        assert d.y.tolist() == [0, 1, 0, 1]
        assert d.task is not None and d.task.tolist() == [0, 0, 1, 1]
        assert d.domain_names == ("scanner_a", "scanner_b") and d.domain.tolist() == [1, 0, 0, 1]
        px = np.asarray(Image.open(root / "imgs" / "2.png")) / 255.0
        assert np.abs(d.x[2, 0] - px).max() <= 1 / 255 + 1e-6
    # The federation's agreed names fix the indices even if this site lacks some of them.
    d = load_folder(
        root,
        class_names=["malignant", "benign", "unknown"],
        domain_names=["scanner_c", "scanner_b", "scanner_a"],
    )
    assert d.y.tolist() == [1, 0, 1, 0] and d.num_classes == 3
    assert d.domain.tolist() == [1, 2, 2, 1] and d.domain_names[0] == "scanner_c"
    _raises(
        [str(root / "manifest.csv"), "row 2", "'scanner_b'", "known domains: scanner_a"],
        load_folder,
        root,
        domain_names=["scanner_a"],
    )


def test_manifest_without_optional_columns(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", np.zeros((5, 5), dtype=np.uint8))
    csv = tmp_path / "list.csv"
    csv.write_text("label,path\nok,a.png\n")
    d = load_folder(csv)
    assert d.task is None and d.domain_names == ("default",) and d.x.shape == (1, 1, 5, 5)


# ---------------------------------------------------------------------------------------------
# errors: each names the exact path / row / column
# ---------------------------------------------------------------------------------------------


def _raises(match_all: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for needle in match_all:
        assert needle in message, (needle, message)
    return message


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    _raises([str(missing), "does not exist"], load_folder, missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    _raises([str(empty), "no class subfolders", "manifest", "<class_name>"], load_folder, empty)

    loose = tmp_path / "loose"
    _write(loose / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _raises([str(loose), "subfolder named after its class"], load_folder, loose)

    no_images = tmp_path / "noimg"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "readme.txt").write_text("x")
    _raises([str(no_images), "no images", "accepted layouts"], load_folder, no_images)

    extra = tmp_path / "extra"
    _write(extra / "dog" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _raises([str(extra), "'dog'", "class_names"], load_folder, extra, class_names=["cat"])

    not_csv = tmp_path / "file.txt"
    not_csv.write_text("x")
    _raises([str(not_csv), ".csv"], load_folder, not_csv)

    with pytest.raises(DataError, match="channels"):
        load_folder(extra, channels=2)


def test_corrupt_images_are_named(tmp_path: Path) -> None:
    _write(tmp_path / "ok" / "good.png", np.zeros((4, 4), dtype=np.uint8))
    bad = tmp_path / "ok" / "bad.png"
    bad.write_bytes(b"this is not a png")
    _raises([str(bad), "remove it or replace it"], load_folder, tmp_path)

    # A truncated (not just mislabelled) PNG fails on decode, not on open.
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(bad)
    bad.write_bytes(bad.read_bytes()[:-40])
    _raises([str(bad), "corrupt"], load_folder, tmp_path)


def test_manifest_errors(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    csv = tmp_path / "m.csv"

    csv.write_text("path,class\na.png,cat\n")
    _raises([str(csv), "'label' column", "path,label"], load_folder, csv)

    csv.write_text("file,label\na.png,cat\n")
    _raises([str(csv), "'path' column"], load_folder, csv)

    csv.write_text("path,label\n")
    _raises([str(csv), "no rows"], load_folder, csv)

    csv.write_text("path,label\na.png,cat\na.png,dog\n")
    _raises(
        [str(csv), "row 3", "'dog'", "known labels: cat, cow"],
        load_folder,
        csv,
        class_names=["cat", "cow"],
    )

    csv.write_text("path,label\nmissing.png,cat\n")
    _raises([str(csv), "row 2", str(tmp_path / "missing.png")], load_folder, csv)

    csv.write_text("path,label,task\na.png,cat,0\na.png,cat,two\n")
    _raises([str(csv), "row 3", "'two'", "integer"], load_folder, csv)

    csv.write_text("path,label,task\na.png,cat,-1\n")
    _raises([str(csv), "row 2", "'-1'"], load_folder, csv)


# ---------------------------------------------------------------------------------------------
# partitioning
# ---------------------------------------------------------------------------------------------


def _labels(n: int = 2000, classes: int = 10, domains: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, classes, n), rng.integers(0, domains, n)


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _mean_tv(y: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    glob = np.bincount(y, minlength=classes) / len(y)
    tv = [0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "domain"])
def test_partitions_are_disjoint_complete_and_deterministic(scheme: str) -> None:
    y, dom = _labels()
    parts = partition_indices(y, 4, scheme=scheme, domain=dom, seed=1)
    assert len(parts) == 4 and all(p.dtype == np.int64 for p in parts)
    _assert_partition(parts, len(y))
    again = partition_indices(y, 4, scheme=scheme, domain=dom, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme != "domain":
        other = partition_indices(y, 4, scheme=scheme, domain=dom, seed=2)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced_and_dirichlet_is_skewed() -> None:
    y, _ = _labels()
    iid = partition_indices(y, 5, scheme="iid")
    assert {len(p) for p in iid} == {400}
    skewed = partition_indices(y, 5, scheme="dirichlet", alpha=0.1, min_per_site=10)
    mild = partition_indices(y, 5, scheme="dirichlet", alpha=1000.0)
    tv_iid, tv_skew, tv_mild = (_mean_tv(y, p, 10) for p in (iid, skewed, mild))
    assert tv_iid < 0.1 and tv_mild < 0.1
    assert tv_skew > tv_iid + 0.3, (tv_iid, tv_skew)
    assert min(len(p) for p in skewed) >= 10


def test_domain_scheme_puts_each_domain_on_one_site() -> None:
    y, dom = _labels(domains=6)
    parts = partition_indices(y, 4, scheme="domain", domain=dom)
    for d in range(6):
        holders = [s for s, p in enumerate(parts) if (dom[p] == d).any()]
        assert holders == [d % 4]
    # Absent domain indices are skipped, so no site is left empty.
    sparse = np.where(dom < 3, dom * 10, dom)
    parts = partition_indices(y, 3, scheme="domain", domain=sparse)
    assert all(len(p) > 0 for p in parts)


def test_partition_errors_name_the_field() -> None:
    y, dom = _labels(domains=3)
    _raises(["partition.scheme", "'skewed'", "iid, dirichlet, domain"], partition_indices, y, 3,
            scheme="skewed")  # fmt: skip
    _raises(["partition.num_sites", ">= 1"], partition_indices, y, 0)
    _raises(["partition.alpha", "> 0"], partition_indices, y, 3, scheme="dirichlet", alpha=0.0)
    _raises(["partition.alpha"], partition_indices, y, 3, scheme="dirichlet", alpha=-1.0)
    _raises(
        ["3 domain(s)", "partition.num_sites is 5", "dirichlet"],
        partition_indices,
        y,
        5,
        scheme="domain",
        domain=dom,
    )
    _raises(["domain index per example"], partition_indices, y, 2, scheme="domain")
    _raises(["20 sites", "only 100"], partition_indices, y[:100], 20, min_per_site=10)
    # 10 classes, alpha -> 0: each class lands on ~one site, so 20 sites can never all get 5.
    _raises(
        ["partition.alpha", "partition.num_sites", "too extreme"],
        partition_indices,
        y[:100],
        20,
        scheme="dirichlet",
        alpha=0.01,
        min_per_site=5,
    )


def test_train_test_split_is_stratified_and_deterministic() -> None:
    y = np.repeat(np.arange(4), [100, 50, 20, 1])
    train, test = train_test_split_indices(len(y), test_fraction=0.2, seed=0, stratify=y)
    _assert_partition([train, test], len(y))
    assert np.bincount(y[test], minlength=4).tolist() == [20, 10, 4, 0]  # singleton stays in train
    again = train_test_split_indices(len(y), test_fraction=0.2, seed=0, stratify=y)
    assert np.array_equal(test, again[1])
    assert not np.array_equal(test, train_test_split_indices(len(y), seed=1, stratify=y)[1])
    train, test = train_test_split_indices(10, test_fraction=0.3)
    assert len(test) == 3 and len(train) == 7
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split_indices(10, test_fraction=1.0)

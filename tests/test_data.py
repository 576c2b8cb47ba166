import gzip
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import make_folder, make_npz, write_idx

from defuse.config import DataConfig
from defuse.data import ImageDataModule, load_source


def test_digits_is_embedded_resized_and_in_unit_range():
    loaded = load_source(DataConfig(source="digits", image_size=28))
    pool = loaded.pool
    assert loaded.test is None
    assert pool.images.shape == (1797, 1, 28, 28) and pool.images.dtype == torch.uint8
    assert pool.classes == tuple("0123456789")
    x = pool.float_images()
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_idx_reads_the_official_mnist_test_split(mnist_raw):
    pool = load_source(DataConfig(source="idx", root=str(mnist_raw))).pool
    assert pool.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(pool.labels).tolist()[:3] == [980, 1135, 1032]  # official class counts


def test_idx_fixed_split_takes_the_last_images_as_test(mnist_raw):
    dm = ImageDataModule(DataConfig(source="idx", root=str(mnist_raw), test_size=2000, shuffle=False), seed=0)
    full = load_source(DataConfig(source="idx", root=str(mnist_raw))).pool
    assert len(dm.split("test")) == 2000
    assert sum(len(dm.split(name)) for name in ("train", "val", "audit")) == 8000
    assert (len(dm.split("val")), len(dm.split("audit"))) == (800, 1600)
    assert torch.equal(dm.split("test").labels, full.labels[-2000:])


def test_idx_refuses_a_corrupt_official_file(mnist_raw, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFUSE_MNIST_RAW", str(tmp_path))  # the default folder is md5-verified
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_raw / name, tmp_path / name)
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="does not match the official MNIST md5"):
        load_source(DataConfig(source="idx"))


def test_idx_reads_uncompressed_and_gzipped_train_and_test_pairs(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        labels = np.arange(n) % 3
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            header = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
            f.write(header + labels.astype(np.uint8).tobytes())
    loaded = load_source(DataConfig(source="idx", root=str(tmp_path)))
    assert len(loaded.pool) == 20 and len(loaded.test) == 10
    assert loaded.pool.classes == ("0", "1", "2")


def test_idx_mismatched_counts_are_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4) % 2)
    with pytest.raises(ValueError, match="holds 5 images but .* holds 4 labels"):
        load_source(DataConfig(source="idx", root=str(tmp_path)))


def test_idx_missing_root_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"IDX folder {tmp_path / 'nope'} does not exist")):
        load_source(DataConfig(source="idx", root=str(tmp_path / "nope")))


def test_idx_empty_folder_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No IDX files in"):
        load_source(DataConfig(source="idx", root=str(tmp_path)))


def test_npz_grayscale_and_color(tmp_path):
    make_npz(tmp_path / "g.npz", n=30, k=3, size=28)
    gray = load_source(DataConfig(source="npz", root=str(tmp_path / "g.npz"))).pool
    assert gray.images.shape == (30, 1, 28, 28) and gray.classes == ("0", "1", "2")
    make_npz(tmp_path / "c.npz", n=12, k=2, size=32, channels=3)
    color = load_source(DataConfig(source="npz", root=str(tmp_path / "c.npz"), image_size=32)).pool
    assert color.images.shape == (12, 3, 32, 32)


def test_npz_float_images_are_scaled_and_resized(tmp_path):
    x = np.full((4, 8, 8), 0.5, dtype=np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 1, 0, 1]))
    pool = load_source(DataConfig(source="npz", root=str(tmp_path / "f.npz"), image_size=28)).pool
    assert pool.images.shape == (4, 1, 28, 28)
    assert torch.all((pool.images == 128) | (pool.images == 127))


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((4, 8), np.uint8), np.array([0, 1, 0, 1]), "x must be (N, H, W) or (N, H, W, C), got shape (4, 8)"),
        (np.zeros((4, 8, 8, 2), np.uint8), np.array([0, 1, 0, 1]), "with C in (1, 3), got (4, 8, 8, 2)"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 0]), "y must be (N,) = (4,) to match x, got (3,)"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 0, -1]), "got values in [-1, 1]"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 0, 0, 0]), "must have at least 2 classes, got 1"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 2, 0, 2]), "class(es) 1 have no images"),
        (np.full((4, 8, 8), 2.0, np.float32), np.array([0, 1, 0, 1]), "float images must be finite and in [0, 1]"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0.0, 1.0, 0.0, 1.0]), "y must hold integer class indices"),
    ],
)
def test_npz_bad_inputs_are_refused_with_the_file_and_the_problem(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_source(DataConfig(source="npz", root=str(path)))
    assert str(path) in str(info.value)


def test_npz_labels_beyond_the_named_classes_are_refused(tmp_path):
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 0, 5]), classes=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=re.escape("labels must be in [0, 1] for 2 classes, got values in [0, 5]")):
        load_source(DataConfig(source="npz", root=str(tmp_path / "n.npz")))


def test_npz_missing_file_and_missing_arrays(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"npz file {tmp_path / 'x.npz'} does not exist")):
        load_source(DataConfig(source="npz", root=str(tmp_path / "x.npz")))
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match=re.escape("must hold arrays 'x' and 'y', missing ['x', 'y']")):
        load_source(DataConfig(source="npz", root=str(tmp_path / "a.npz")))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(ValueError, match="not a readable .npz file without pickled objects"):
        load_source(DataConfig(source="npz", root=str(tmp_path / "p.npz")))


def test_a_file_named_npz_that_is_no_archive_is_named_as_such_not_as_pickled_data(tmp_path):
    (tmp_path / "labels.npz").write_text("image,label\n0,3\n")
    with pytest.raises(ValueError) as refused:
        load_source(DataConfig(source="npz", root=str(tmp_path / "labels.npz")))
    message = str(refused.value)
    assert "is not an .npz archive (it begins b'imag'" in message and "numpy.savez('labels.npz'" in message
    assert "pickle" not in message


def test_folder_reads_classes_from_subfolders(tmp_path):
    make_folder(tmp_path, classes=("cat", "dog", "eel"), per_class=3, size=(28, 28))
    pool = load_source(DataConfig(source="folder", root=str(tmp_path))).pool
    assert pool.images.shape == (9, 1, 28, 28)
    assert pool.classes == ("cat", "dog", "eel") and pool.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_folder_color_images_have_three_channels(tmp_path):
    make_folder(tmp_path, size=(32, 32), mode="RGB")
    pool = load_source(DataConfig(source="folder", root=str(tmp_path), image_size=32)).pool
    assert pool.images.shape == (8, 3, 32, 32)


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"Image folder {tmp_path / 'none'} does not exist")):
        load_source(DataConfig(source="folder", root=str(tmp_path / "none")))

    one = tmp_path / "one"
    make_folder(one, classes=("a",))
    with pytest.raises(ValueError, match=re.escape(f"{one} must hold at least 2 class sub-folders, got 1 instead")):
        load_source(DataConfig(source="folder", root=str(one)))

    empty = tmp_path / "empty"
    make_folder(empty)
    (empty / "zebra").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"Class folder {empty / 'zebra'} is empty")):
        load_source(DataConfig(source="folder", root=str(empty)))

    junk = tmp_path / "junk"
    make_folder(junk)
    (junk / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=re.escape(f"{junk / 'cat' / 'notes.txt'} is not an image file")):
        load_source(DataConfig(source="folder", root=str(junk)))

    fake = tmp_path / "fake"
    make_folder(fake)
    (fake / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(f"{fake / 'dog' / 'broken.png'} is not a readable image")):
        load_source(DataConfig(source="folder", root=str(fake)))

    mixed = tmp_path / "mixed"
    make_folder(mixed, size=(10, 10))
    make_folder(mixed / "extra", classes=("big",), per_class=1, size=(12, 12))
    shutil.move(str(mixed / "extra" / "big" / "0.png"), str(mixed / "dog" / "z.png"))
    shutil.rmtree(mixed / "extra")
    with pytest.raises(ValueError, match=re.escape(f"{mixed / 'dog' / 'z.png'} is 12x12 but")):
        load_source(DataConfig(source="folder", root=str(mixed)))


def test_torchvision_source_missing_files_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"The mnist dataset \(train split\) is not under .*data.download=true"):
        load_source(DataConfig(source="mnist", root=str(tmp_path)))


def test_gtsrb_reads_torchvision_s_folder_layout_at_any_image_size_with_its_own_test_split(tmp_path):
    """A tiny fake of torchvision's GTSRB layout (PPM files of varied sizes, the test labels in a CSV): read without
    a download, every image resized to the module's 32 px, the official test split kept apart."""
    from PIL import Image

    base = tmp_path / "gtsrb"
    rng = np.random.default_rng(0)
    for k in range(2):
        folder = base / "GTSRB" / "Training" / f"{k:05d}"
        folder.mkdir(parents=True)
        for i, size in enumerate((29, 41, 35)):
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(folder / f"{i}.ppm")
    test_folder = base / "GTSRB" / "Final_Test" / "Images"
    test_folder.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, k in enumerate((0, 1, 1)):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(test_folder / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;30;30;0;0;29;29;{k}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    loaded = load_source(DataConfig(source="gtsrb", root=str(tmp_path), image_size=32))
    assert loaded.pool.images.shape == (6, 3, 32, 32) and loaded.pool.labels.tolist().count(1) == 3
    assert loaded.test.images.shape == (3, 3, 32, 32) and loaded.test.labels.tolist() == [0, 1, 1]
    with pytest.raises(FileNotFoundError, match="gtsrb dataset.*data.download=true"):
        load_source(DataConfig(source="gtsrb", root=str(tmp_path / "elsewhere")))


def test_splits_are_disjoint_complete_and_seeded():
    config = DataConfig(source="digits")
    a, b, c = ImageDataModule(config, seed=0), ImageDataModule(config, seed=0), ImageDataModule(config, seed=1)
    assert a.sizes() == {"train": 943, "val": 135, "audit": 270, "test": 449}
    for name in ("train", "val", "audit", "test"):
        assert torch.equal(a.split(name).images, b.split(name).images)
        assert torch.equal(a.indices(name), b.indices(name))
    assert not torch.equal(a.indices("audit"), c.indices("audit"))
    everything = torch.cat([a.indices(name) for name in ("train", "val", "audit", "test")])
    assert sorted(everything.tolist()) == list(range(1797))  # a partition of the 1,797 images


def _numbered_images(n: int, first: int = 0, size: int = 8) -> np.ndarray:
    """(n, size, size) uint8 images that carry their number in their first two pixels (exact at native size)."""
    x = np.full((n, size, size), 40, dtype=np.uint8)
    ids = np.arange(first, first + n)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    return x


def _numbers(images) -> set[int]:
    pixels = images.images[:, 0, 0, :2].long()
    return set((pixels[:, 0] * 256 + pixels[:, 1]).tolist())


def _write_numbered_idx(folder, prefix: str, n: int, first: int, k: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", _numbered_images(n, first))
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % k)


def _source(kind: str, tmp_path) -> tuple[DataConfig, int]:
    """A source of the given kind whose images carry unique numbers; and how many images it holds."""
    common = dict(image_size=8, test_size=0.2, val_size=0.1, audit_size=0.2)
    if kind == "npz":
        np.savez(tmp_path / "x.npz", x=_numbered_images(200), y=np.arange(200) % 4)
        return DataConfig(source="npz", root=str(tmp_path / "x.npz"), **common), 200
    if kind == "folder":
        from PIL import Image

        for i, image in enumerate(_numbered_images(120)):
            (tmp_path / "img" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / "img" / f"c{i % 3}" / f"{i}.png")
        return DataConfig(source="folder", root=str(tmp_path / "img"), **common), 120
    if kind == "idx-with-test":
        _write_numbered_idx(tmp_path / "idx", "train", 150, 0)
        _write_numbered_idx(tmp_path / "idx", "t10k", 50, 1000)
        return DataConfig(source="idx", root=str(tmp_path / "idx"), **common), 200
    if kind == "idx-test-only":
        _write_numbered_idx(tmp_path / "idx", "t10k", 160, 0)
        return DataConfig(source="idx", root=str(tmp_path / "idx"), **common), 160
    if kind == "mnist":  # torchvision's own reader, on files laid out as torchvision keeps them
        _write_numbered_idx(tmp_path / "tv" / "MNIST" / "raw", "train", 150, 0, k=10)
        _write_numbered_idx(tmp_path / "tv" / "MNIST" / "raw", "t10k", 50, 1000, k=10)
        return DataConfig(source="mnist", root=str(tmp_path / "tv"), **common), 200
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["npz", "folder", "idx-with-test", "idx-test-only", "mnist"])
def test_the_four_splits_are_disjoint_and_complete_for_every_source_kind(kind, tmp_path):
    config, total = _source(kind, tmp_path)
    data = ImageDataModule(config, seed=0)
    numbers = {name: _numbers(data.split(name)) for name in ("train", "val", "audit", "test")}
    assert all(len(numbers[name]) == len(data.split(name)) > 0 for name in numbers)  # no image twice in a split
    names = list(numbers)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not numbers[first] & numbers[second], (first, second)
    assert sum(len(v) for v in numbers.values()) == total
    if kind in ("idx-with-test", "mnist"):  # an official test split stays whole; audit is carved from training
        assert numbers["test"] == set(range(1000, 1050))


def test_val_and_audit_that_leave_no_training_images_are_refused():
    data = ImageDataModule(DataConfig(source="digits", val_size=0.5, audit_size=0.5), seed=0)
    with pytest.raises(ValueError, match=re.escape("`data.val_size` = 0.5 and `data.audit_size` = 0.5 take 1348 "
                                                   "of the 1348 images left after the test split")):
        data.setup()


def test_loader_yields_float_batches_in_unit_range():
    dm = ImageDataModule(DataConfig(source="digits", batch_size=64), seed=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_test_size_that_leaves_nothing_is_refused():
    dm = ImageDataModule(DataConfig(source="digits", test_size=5000), seed=0)
    with pytest.raises(ValueError, match=re.escape("`data.test_size` = 5000 leaves 5000 of 1797 images")):
        dm.setup()

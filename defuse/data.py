"""Image sources and the :class:`ImageDataModule` that splits them.

Notation: N images, C channels (1 or 3), H = W = ``image_size``, K classes.
Images are stored as uint8 ``(N, C, H, W)`` tensors and handed out as float
tensors in [0, 1]; labels are int64 ``(N,)`` in ``[0, K)``.

Sources (``data.source``): ``digits`` (scikit-learn's bundled 8x8 digits, the
embedded default), ``signs`` (traffic signs rendered by :mod:`defuse.signs`), the torchvision datasets in :data:`defuse.config.TORCHVISION_SOURCES`,
``idx`` (a folder of MNIST-format IDX files), ``folder`` (an ImageFolder tree) and
``npz`` (arrays ``x`` and ``y``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from defuse.config import SPLITS, TORCHVISION_SOURCES, DataConfig
from defuse.seeding import torch_generator

MNIST_RAW_ENV = "DEFUSE_MNIST_RAW"
# md5 of the official MNIST files, as torchvision lists them; checked whenever an idx folder holds them.
_KNOWN_IDX_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


@dataclass(frozen=True)
class ImageSet:
    """A labelled set of images: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return replace(self, images=self.images[index], labels=self.labels[index])

    def float_images(self) -> torch.Tensor:
        """The images as float32 in [0, 1], (N, C, H, W)."""
        return self.images.float().div_(255.0)


@dataclass(frozen=True)
class LoadedSource:
    """What a source gives: a pool of images, and its official test split when it has one."""

    pool: ImageSet
    test: ImageSet | None = None


# ----------------------------------------------------------------------------- sources


def default_mnist_raw() -> Path:
    """The MNIST IDX folder used by tests and benchmarks: $DEFUSE_MNIST_RAW, else ../shared/data/MNIST/raw
    next to the repository root."""
    if os.environ.get(MNIST_RAW_ENV):
        return Path(os.environ[MNIST_RAW_ENV])
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data" / "MNIST" / "raw"


def load_source(config: DataConfig) -> LoadedSource:
    """Read the configured source, validate it and resize it to ``config.image_size``."""
    source = config.source
    if source == "digits":
        loaded = _load_digits()
    elif source == "signs":
        loaded = _load_signs(config)
    elif source in TORCHVISION_SOURCES:
        loaded = _load_torchvision(source, Path(config.root or "data"), config.download)
    elif source == "idx":
        # The default folder is the official MNIST test split: verify it; a user's own IDX files need not be MNIST.
        loaded = _load_idx(Path(config.root) if config.root else default_mnist_raw(), verify_md5=not config.root)
    elif source == "folder":
        loaded = LoadedSource(_load_folder(Path(config.root)))
    elif source == "npz":
        loaded = _load_npz(Path(config.root))
    else:  # validated in DataConfig; kept so a new source cannot be half-added
        raise ValueError(f"`data.source` {source!r} is not supported.")
    pool = _resize(loaded.pool, config.image_size)
    test = _resize(loaded.test, config.image_size) if loaded.test is not None else None
    return LoadedSource(pool, test)


def _load_digits() -> LoadedSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16; scale to the uint8 range every other source uses.
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return LoadedSource(_checked(images, labels, tuple(str(c) for c in bunch.target_names), "sklearn digits"))


def _load_signs(config: DataConfig) -> LoadedSource:
    from defuse.signs import CLASSES, Rare, sign_sets

    classes, rare = tuple(config.signs.classes or CLASSES), config.signs.rare
    pool, test = sign_sets(config.signs.images_per_class, config.signs.test_per_class, config.signs.seed,
                           config.image_size, classes,
                           Rare(rare.sign, rare.factor, tuple(rare.values), rare.keep) if rare.sign else None)
    return LoadedSource(ImageSet(pool.images, pool.labels, classes), ImageSet(test.images, test.labels, classes))


def _load_torchvision(name: str, root: Path, download: bool) -> LoadedSource:
    import torchvision.datasets as tvd

    def build(train: bool):
        split = "train" if train else "test"
        try:
            if name == "mnist":
                return tvd.MNIST(root, train=train, download=download)
            if name == "fashion-mnist":
                return tvd.FashionMNIST(root, train=train, download=download)
            if name == "kmnist":
                return tvd.KMNIST(root, train=train, download=download)
            if name == "cifar10":
                return tvd.CIFAR10(root, train=train, download=download)
            if name == "svhn":
                return tvd.SVHN(root, split=split, download=download)
            return tvd.GTSRB(root, split=split, download=download)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"The {name} dataset ({split} split) is not under {root.resolve()} ({err}). "
                f"Put torchvision's files there, point --set data.root=DIR at them, "
                f"or allow the download with --set data.download=true."
            ) from None

    sets = []
    for train in (True, False):
        ds = build(train)
        if name in ("mnist", "fashion-mnist", "kmnist"):
            images, labels, classes = ds.data.unsqueeze(1), ds.targets, tuple(ds.classes)
        elif name == "cifar10":
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
            labels, classes = torch.tensor(ds.targets), tuple(ds.classes)
        elif name == "svhn":
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
            classes = tuple(str(i) for i in range(10))
        else:  # GTSRB images differ in size: read them at the module's size through PIL
            images, labels = _read_image_files([Path(p) for p, _ in ds._samples], [c for _, c in ds._samples], 32)
            classes = tuple(str(i) for i in range(int(labels.max()) + 1))
        sets.append(_checked(images.contiguous(), labels.long(), classes, f"{name} under {root}"))
    return LoadedSource(sets[0], sets[1])


def _find_idx_pair(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    def find(kind: str) -> Path | None:
        for suffix in ("", ".gz"):
            path = folder / f"{prefix}-{kind}{suffix}"
            if path.is_file():
                return path
        return None

    images, labels = find("images-idx3-ubyte"), find("labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _read_idx(path: Path, verify_md5: bool) -> torch.Tensor:
    """Read one IDX file with torchvision's reader, decompressing a .gz copy first (the reader wants raw files)."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    from torchvision.datasets.utils import check_integrity

    expected = _KNOWN_IDX_MD5.get(path.name)
    if verify_md5 and expected and not check_integrity(str(path), expected):
        raise ValueError(
            f"{path} does not match the official MNIST md5 {expected}: the file is corrupt or truncated. "
            f"Replace it with a fresh copy."
        )
    try:
        if path.suffix == ".gz":
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / path.stem
                with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                return read_sn3_pascalvincent_tensor(str(raw), strict=True)
        return read_sn3_pascalvincent_tensor(str(path), strict=True)
    except (AssertionError, OSError, KeyError, RuntimeError) as err:
        raise ValueError(f"{path} is not a valid IDX file ({type(err).__name__}: {err}).") from None


def _load_idx(folder: Path, verify_md5: bool = False) -> LoadedSource:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"IDX folder {folder} does not exist. Set --set data.root=DIR (or ${MNIST_RAW_ENV}) to a folder holding "
            f"e.g. t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]."
        )
    sets: dict[str, ImageSet] = {}
    for prefix in ("train", "t10k"):
        pair = _find_idx_pair(folder, prefix)
        if pair is None:
            continue
        images, labels = _read_idx(pair[0], verify_md5), _read_idx(pair[1], verify_md5)
        if images.dim() != 3 or labels.dim() != 1:
            raise ValueError(
                f"{pair[0].name} must hold (N, H, W) images and {pair[1].name} (N,) labels, "
                f"got {tuple(images.shape)} and {tuple(labels.shape)} instead."
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{pair[0]} holds {images.shape[0]} images but {pair[1]} holds {labels.shape[0]} labels."
            )
        classes = tuple(str(i) for i in range(int(labels.max()) + 1))
        sets[prefix] = _checked(images.unsqueeze(1).to(torch.uint8), labels.long(), classes, str(pair[0]))
    if not sets:
        raise FileNotFoundError(
            f"No IDX files in {folder}: expected train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] "
            f"and/or t10k-images-idx3-ubyte[.gz] + t10k-labels-idx1-ubyte[.gz]."
        )
    if len(sets) == 2:
        return LoadedSource(sets["train"], sets["t10k"])
    return LoadedSource(next(iter(sets.values())))


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _read_image_files(paths: list[Path], labels: list[int], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read image files into one uint8 tensor. With ``size`` None all files must share one size."""
    from PIL import Image, UnidentifiedImageError

    arrays, modes, first_size, first_path = [], set(), None, None
    opened = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                opened.append(img.copy())
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not a readable image ({err}). Remove it or replace it.") from None
        modes.add("L" if opened[-1].mode in ("L", "1", "I;16", "I") else "RGB")
    mode = "L" if modes == {"L"} else "RGB"
    for path, img in zip(paths, opened):
        img = img.convert(mode)
        if size is not None:
            img = img.resize((size, size))
        elif first_size is None:
            first_size, first_path = img.size, path
        elif img.size != first_size:
            raise ValueError(
                f"{path} is {img.size[0]}x{img.size[1]} but {first_path} is {first_size[0]}x{first_size[1]}: "
                f"all images of a folder source must share one size. Resize them first."
            )
        arrays.append(np.asarray(img, dtype=np.uint8))
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]
    else:
        stacked = stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)), torch.tensor(labels, dtype=torch.int64)


def _load_folder(root: Path) -> ImageSet:
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist. Point --set data.root=DIR at a folder "
                                f"with one sub-folder of images per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ValueError(
            f"{root} must hold at least 2 class sub-folders, got {len(class_dirs)} instead "
            f"({', '.join(p.name for p in class_dirs) or 'none'})."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        for file in files:
            if file.suffix.lower() not in _IMAGE_EXTENSIONS:
                raise ValueError(
                    f"{file} is not an image file (extension {file.suffix or 'none'}; expected one of "
                    f"{', '.join(_IMAGE_EXTENSIONS)}). Move it out of the class folders."
                )
        if not files:
            raise ValueError(f"Class folder {class_dir} is empty: every class needs at least one image.")
        paths.extend(files)
        labels.extend([index] * len(files))
    images, label_tensor = _read_image_files(paths, labels, size=None)
    return _checked(images, label_tensor, tuple(p.name for p in class_dirs), str(root))


def _load_npz(path: Path) -> LoadedSource:
    """Arrays ``x`` and ``y`` (the pool train, val and audit come from), ``classes`` if named, and ``x_test`` and
    ``y_test`` if the data come with their own test split (``defuse.scan`` writes one for a user's datasets)."""
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist. Point --set data.root=FILE.npz at arrays x and y.")
    with path.open("rb") as file:
        head = file.read(4)
    if head != b"PK\x03\x04":  # an .npz is a zip archive; anything else would reach numpy's pickle refusal
        raise ValueError(f"{path} is not an .npz archive (it begins {head!r}; an .npz, a zip of arrays, begins "
                         f"b'PK\\x03\\x04'). Write one with numpy.savez({path.name!r}, x=images, y=labels).")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npz file without pickled objects ({err}).") from None
    missing = [key for key in ("x", "y") if key not in arrays.files]
    if missing:
        raise ValueError(f"{path} must hold arrays 'x' and 'y', missing {missing}; found {arrays.files}.")
    if ("x_test" in arrays.files) != ("y_test" in arrays.files):
        raise ValueError(f"{path}: a test split needs both 'x_test' and 'y_test'; found {arrays.files}.")
    classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays.files else None
    pool = _npz_images(arrays, "x", "y", path, classes)
    if "x_test" not in arrays.files:
        return LoadedSource(pool)
    test = _npz_images(arrays, "x_test", "y_test", path, pool.classes)
    if test.images.shape[1:] != pool.images.shape[1:]:
        raise ValueError(f"{path}: x_test images are {tuple(test.images.shape[1:])}, x images "
                         f"{tuple(pool.images.shape[1:])}; they must match.")
    return LoadedSource(pool, test)


def _npz_images(arrays, x_key: str, y_key: str, path: Path, classes: tuple[str, ...] | None) -> ImageSet:
    try:
        x, y = arrays[x_key], arrays[y_key]
    except ValueError as err:  # object arrays need unpickling, which we never do
        raise ValueError(f"{path} is not a readable .npz file without pickled objects ({err}).") from None
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: {x_key} must be (N, H, W) or (N, H, W, C) with C in (1, 3), got {x.shape} instead.")
    if x.ndim not in (3, 4):
        raise ValueError(f"{path}: {x_key} must be (N, H, W) or (N, H, W, C), got shape {x.shape} instead.")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{path}: {y_key} must be (N,) = ({x.shape[0]},) to match x, got {y.shape} instead.")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer class indices, got dtype {y.dtype} instead.")
    if x.dtype == np.uint8:
        images = x
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"{path}: float images must be finite and in [0, 1], got range "
                f"[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}] instead. Scale them, or store uint8."
            )
        images = np.rint(x * 255).astype(np.uint8)
    else:
        raise ValueError(f"{path}: {x_key} must be uint8 or float in [0, 1], got dtype {x.dtype} instead.")
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = torch.from_numpy(y.astype(np.int64))
    k = int(labels.max()) + 1 if len(labels) else 0
    classes = classes if classes is not None else tuple(map(str, range(k)))
    return _checked(torch.from_numpy(np.ascontiguousarray(images)), labels, classes, f"{path} ({x_key}, {y_key})")


def _checked(images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], origin: str) -> ImageSet:
    """Refuse data that later stages would silently mishandle."""
    if len(labels) == 0:
        raise ValueError(f"{origin} holds no images.")
    if len(classes) < 2:
        raise ValueError(f"{origin} must have at least 2 classes, got {len(classes)} instead.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(classes):
        raise ValueError(
            f"{origin}: labels must be in [0, {len(classes) - 1}] for {len(classes)} classes, "
            f"got values in [{low}, {high}] instead."
        )
    counts = torch.bincount(labels, minlength=len(classes))
    empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"{origin}: class(es) {', '.join(empty)} have no images; every class needs at least one.")
    return ImageSet(images, labels, classes)


def _resize(images: ImageSet, size: int) -> ImageSet:
    if images.images.shape[-1] == size and images.images.shape[-2] == size:
        return images
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(images.images, [size, size], antialias=True)
    return replace(images, images=resized.contiguous())


# ----------------------------------------------------------------------------- splits


class ImageTensorDataset(Dataset):
    """Batched view of an :class:`ImageSet`: yields float images in [0, 1] and labels.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one indexing
    operation instead of one Python call per sample.
    """

    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.images[index].float() / 255.0, self.images.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images.images[index].float().div_(255.0), self.images.labels[index]


def _whole_batch(batch):
    return batch


def _count(size: float, total: int) -> int:
    return int(round(size * total)) if size < 1 else int(size)


MIN_IMAGES_PER_CLASS = 10  # below this, a class's test and audit shares are a few images or none


class ImageDataModule(pl.LightningDataModule):
    """Loads one source and owns its four seeded, disjoint splits.

    * ``test``: the source's official test split, else ``data.test_size`` images of the pool. Grading only:
      no stage fits, searches or selects on it.
    * ``val``: ``data.val_size`` of the rest; early checks and the repair's choice of lambda and epochs.
    * ``audit``: ``data.audit_size`` of the rest; discovery's data (the search's sources, the validity judge,
      distill's real evidence). Neither the classifier, the generator nor the repair trains on it.
    * ``train``: what remains.

    ``indices(name)`` gives each split's positions in the source (the pool, or the official test set for
    ``test`` when the source has one), so a split can be traced back to the files.

    Args:
        config: the data section of the run config.
        seed: seeds the split permutation and the training shuffle.
    """

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.train: ImageSet | None = None
        self.val: ImageSet | None = None
        self.audit: ImageSet | None = None
        self.test: ImageSet | None = None
        self._indices: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:  # downloads happen only when the user allowed them
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        loaded = load_source(self.config)
        generator = torch_generator(self.seed, "data.split")
        pool = loaded.pool
        n = len(pool)
        if loaded.test is None:
            n_test = _count(self.config.test_size, n)
            if not 0 < n_test < n:
                raise ValueError(
                    f"`data.test_size` = {self.config.test_size} leaves {n_test} of {n} images for testing; "
                    f"choose a fraction in (0, 1) or a count in [1, {n - 1}]."
                )
            order = torch.randperm(n, generator=generator) if self.config.shuffle else torch.arange(n)
            self._indices["test"], rest = order[n - n_test:], order[: n - n_test]
            self.test = pool.subset(self._indices["test"])
        else:
            self._indices["test"], rest = torch.arange(len(loaded.test)), torch.arange(n)
            self.test = loaded.test
        n_val = _count(self.config.val_size, len(rest)) if self.config.val_size > 0 else 0
        n_audit = _count(self.config.audit_size, len(rest)) if self.config.audit_size > 0 else 0
        if n_val + n_audit >= len(rest):
            raise ValueError(
                f"`data.val_size` = {self.config.val_size} and `data.audit_size` = {self.config.audit_size} take "
                f"{n_val + n_audit} of the {len(rest)} images left after the test split, leaving none to train on; "
                f"lower them."
            )
        rest = rest[torch.randperm(len(rest), generator=generator)]
        self._indices["val"] = rest[:n_val]
        self._indices["audit"] = rest[n_val : n_val + n_audit]
        self._indices["train"] = rest[n_val + n_audit:]
        self.val, self.audit, self.train = (pool.subset(self._indices[name]) for name in ("val", "audit", "train"))

    def indices(self, name: str) -> torch.Tensor:
        """Positions of split ``name`` in its source: the pool, or the official test set for ``test`` if any."""
        self.split(name)
        return self._indices[name]

    def sizes(self) -> dict[str, int]:
        """Images per split, for manifests and run summaries."""
        return {name: len(self.split(name)) for name in SPLITS}

    def require_enough_images(self) -> None:
        """Stop a run whose data are too few to train on, search and grade: below :data:`MIN_IMAGES_PER_CLASS`
        labelled images of a class, each split it is carved into holds a handful or none of it, and the checks
        would give verdicts over no images at all."""
        counts = torch.bincount(torch.cat([self.split(name).labels for name in SPLITS]), minlength=self.num_classes)
        short = [(name, int(count)) for name, count in zip(self.classes, counts) if count < MIN_IMAGES_PER_CLASS]
        if short:
            listed = ", ".join(f"{name!r} {count}" for name, count in short[:5]) + (" ..." if len(short) > 5 else "")
            raise ValueError(
                f"{self.config.root or self.config.source}: {int(counts.sum())} images, too few of class {listed}. "
                f"defuse needs at least {MIN_IMAGES_PER_CLASS} labelled images of every class to train a classifier, "
                f"search its bugs and grade them (train, val, audit and test are carved from them): add images, or "
                f"leave out the classes that have too few.")

    # ---- facts other stages need
    @property
    def classes(self) -> tuple[str, ...]:
        self.setup()
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        self.setup()
        return int(self.train.images.shape[1])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, for the classifier's built-in normalisation."""
        self.setup()
        x = self.train.float_images()
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise ValueError(f"`split` must be one of {', '.join(SPLITS)}; got {name!r} instead.")
        self.setup()
        return {"train": self.train, "val": self.val, "audit": self.audit, "test": self.test}[name]

    # ---- loaders
    def images_loader(self, images: ImageSet, shuffle: bool, stream: str = "data.shuffle") -> DataLoader:
        """A batched loader over ``images`` with this module's batch size and workers; shuffled from the named
        random ``stream`` of the seed, so two users of the same images never share one order by accident."""
        generator = torch_generator(self.seed, stream) if shuffle else None
        return DataLoader(
            ImageTensorDataset(images), batch_size=self.config.batch_size, shuffle=shuffle,
            generator=generator, num_workers=self.config.num_workers, collate_fn=_whole_batch,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.images_loader(self.split("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.images_loader(self.split("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.images_loader(self.split("test"), shuffle=False)

    def loader(self, name: str, shuffle: bool = False) -> DataLoader:
        return self.images_loader(self.split(name), shuffle=shuffle)

"""MNIST for the course: one loader, clear errors, and an offline fallback.

Where the data lives
--------------------
The data root is, in order: the ``root`` argument, ``$COURSE_DATA_DIR``, or
``~/.cache/deep-generative-course``. Inside it torchvision's layout is used::

    ROOT/MNIST/raw/train-images-idx3-ubyte.gz   (or without .gz)
    ROOT/MNIST/raw/train-labels-idx1-ubyte.gz
    ROOT/MNIST/raw/t10k-images-idx3-ubyte.gz
    ROOT/MNIST/raw/t10k-labels-idx1-ubyte.gz

Files copied there by hand are read directly (gzipped or not), so the course
works with no network. The folder may be read-only.

Only the test split? (the 8,000 / 2,000 split)
----------------------------------------------
Machines without internet (CI) may hold only the 10,000 test images. The course
then trains on the **first 8,000** of them and holds out the **last 2,000**.
This happens automatically in the ``smoke`` budget, and in any budget when asked
for with ``$COURSE_TEST_SPLIT=1`` (or ``course train --test-split``). A line is
always printed when the split is in use; ``describe(dataset)`` says so too.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
import torchvision

from .runtime import CourseError, budget

DATA_ENV = "COURSE_DATA_DIR"
TEST_SPLIT_ENV = "COURSE_TEST_SPLIT"
DEFAULT_ROOT = Path.home() / ".cache" / "deep-generative-course"
TEST_SPLIT_TRAIN_SIZE = 8_000  # first 8,000 test images train; the last 2,000 are held out

# (file stem, magic number, shape after the header)
_FILES = {
    "train": [("train-images-idx3-ubyte", 2051, (60_000, 28, 28)),
              ("train-labels-idx1-ubyte", 2049, (60_000,))],
    "test": [("t10k-images-idx3-ubyte", 2051, (10_000, 28, 28)),
             ("t10k-labels-idx1-ubyte", 2049, (10_000,))],
}
_HOW_TO_GET = (
    "download them with `course data --root ROOT` on a machine with internet, or copy the "
    "original .gz files from http://yann.lecun.com/exdb/mnist/ (or any mirror) into that folder"
)


class MNISTNotFoundError(CourseError):
    """The MNIST files are missing, partial or could not be downloaded."""


class CorruptMNISTError(CourseError):
    """An MNIST file exists but is not what it should be (magic number, size)."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, then ``$COURSE_DATA_DIR``, then the default."""
    chosen = root or os.environ.get(DATA_ENV) or DEFAULT_ROOT
    return Path(chosen).expanduser().resolve()


def raw_folder(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "MNIST" / "raw"


def expected_files(split: str) -> list[str]:
    return [f"{stem}.gz" for stem, _, _ in _FILES[split]]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def split_available(split: str, root=None) -> bool:
    """Are both files (images and labels) of ``split`` present under the root?"""
    folder = raw_folder(root)
    return all(_find(folder, stem) is not None for stem, _, _ in _FILES[split])


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one IDX file (gzipped or not), checking its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise CorruptMNISTError(f"{path}: cannot be read ({err}); delete it and fetch it again") from err
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise CorruptMNISTError(
            f"{path}: wrong magic number {found} (expected {magic}); the file is corrupt or "
            "is not an MNIST file. Delete it and fetch it again."
        )
    header = 4 + 4 * len(shape)
    dims = struct.unpack(">" + "I" * len(shape), raw[4:header])
    expected_bytes = header + int(torch.tensor(shape).prod())
    if tuple(dims) != tuple(shape) or len(raw) != expected_bytes:
        raise CorruptMNISTError(
            f"{path}: wrong size (header says {tuple(dims)}, {len(raw)} bytes; expected "
            f"{tuple(shape)}, {expected_bytes} bytes). The file is truncated or corrupt: "
            "delete it and fetch it again."
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _missing_message(split: str, root: Path, extra: str = "") -> str:
    files = ", ".join(expected_files(split))
    return (
        f"MNIST {split} split not found in {root / 'MNIST' / 'raw'}: expected the files {files}. "
        f"{extra}To get them, {_HOW_TO_GET}. Or point ${DATA_ENV} at a folder that has them."
    )


def test_split_requested() -> bool:
    return os.environ.get(TEST_SPLIT_ENV, "").strip().lower() in {"1", "true", "yes"}


def uses_test_split(root=None, budget_name: str | None = None) -> bool:
    """Will ``mnist()`` use the 8,000/2,000 split of the test images?

    Only when the train files are absent, the test files present, and either the
    budget is ``smoke`` or the split was asked for with ``$COURSE_TEST_SPLIT=1``.
    """
    if split_available("train", root) or not split_available("test", root):
        return False
    return budget(budget_name) == "smoke" or test_split_requested()


def _reason(err: BaseException) -> str:
    """The most specific message in an exception chain (torchvision wraps the network's)."""
    found, seen = type(err).__name__, set()
    if str(err).startswith("Error downloading"):  # torchvision tried every mirror and gave up
        found = "none of the download mirrors could be reached: no internet connection?"
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(getattr(err, "reason", "") or err).strip().splitlines()
        text = text[0].strip(" :") if text else ""
        if text and not text.startswith("Error downloading"):
            found = f"{type(err).__name__}: {text}"
        err = err.__cause__ or err.__context__
    return found


class MNIST(torchvision.datasets.MNIST):
    """torchvision's MNIST, returning tensors, reading hand-placed ``.gz`` files.

    ``image`` is a float tensor 1x28x28 in [0, 1]; with ``binarize`` it holds
    0/1 values, drawn afresh at every access (``"dynamic"``) or once, from a
    fixed seed, for evaluation sets (``"fixed"``).
    """

    def __init__(self, root, train=True, download=True, binarize=False, binarize_seed=0):
        self.binarize = _binarize_mode(binarize)
        self.binarize_seed = binarize_seed
        self.note = ""
        split = "train" if train else "test"
        if not download and not split_available(split, root):
            raise MNISTNotFoundError(_missing_message(split, data_root(root)))
        # torchvision's base class loads the data through the hooks below
        super().__init__(str(data_root(root)), train=train, download=download)
        self.description = f"MNIST {'train' if train else 'test'} ({len(self.targets):,} images)"
        if self.binarize == "fixed":
            generator = torch.Generator().manual_seed(binarize_seed)
            self.fixed_binary = torch.bernoulli(self.data.float() / 255, generator=generator)

    # -- hooks of torchvision.datasets.MNIST ------------------------------------
    @property
    def raw_folder(self) -> str:
        return str(Path(self.root) / "MNIST" / "raw")

    def _check_exists(self) -> bool:
        return split_available("train" if self.train else "test", self.root)

    def _check_legacy_exist(self) -> bool:
        return False

    def _load_data(self):
        split = "train" if self.train else "test"
        folder = Path(self.raw_folder)
        tensors = []
        for stem, magic, shape in _FILES[split]:
            path = _find(folder, stem)
            if path is None:
                raise MNISTNotFoundError(_missing_message(split, Path(self.root)))
            tensors.append(read_idx(path, magic, shape))
        images, labels = tensors
        return images, labels.long()

    def download(self) -> None:
        if self._check_exists():
            return
        split = "train" if self.train else "test"
        prefix = "train" if self.train else "t10k"
        # torchvision fetches all four files; fetch this split's two only
        self.resources = [r for r in type(self).resources if r[0].startswith(prefix)]
        try:
            Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
            super().download()
        except Exception as err:  # network, permissions, checksum: one clear message, no chain
            raise MNISTNotFoundError(
                _missing_message(split, Path(self.root), f"The download failed ({_reason(err)}). ")
            ) from None

    # -- access ----------------------------------------------------------------
    def __getitem__(self, index):
        if self.binarize == "fixed":
            image = self.fixed_binary[index].unsqueeze(0)
        else:
            image = self.data[index].float().div_(255).unsqueeze(0)
            if self.binarize == "dynamic":
                image = torch.bernoulli(image)
        return image, int(self.targets[index])

    def keep(self, rows: slice, note: str) -> MNIST:
        """Keep only ``rows`` (used for the 8,000/2,000 split)."""
        self.data, self.targets = self.data[rows], self.targets[rows]
        if self.binarize == "fixed":
            self.fixed_binary = self.fixed_binary[rows]
        self.note = note
        self.description = note
        return self


def _binarize_mode(binarize) -> str | None:
    if binarize in (False, None, "none"):
        return None
    if binarize in (True, "dynamic"):
        return "dynamic"
    if binarize == "fixed":
        return "fixed"
    raise ValueError(f"binarize must be False, True/'dynamic' or 'fixed', not {binarize!r}")


_announced: set[str] = set()


def mnist(split: str = "train", root=None, download: bool = True, binarize=False,
          binarize_seed: int = 0, budget_name: str | None = None) -> MNIST:
    """MNIST as a ``Dataset`` of ``(image, label)``; image is 1x28x28 in [0, 1].

    split:    ``"train"`` or ``"test"``.
    root:     the data root (see the module docstring); files may be placed by hand.
    download: fetch missing files (needs internet; failures raise one clear error).
    binarize: ``False``; ``True``/``"dynamic"`` (a fresh Bernoulli draw at each
              access, for training); ``"fixed"`` (drawn once from ``binarize_seed``,
              for evaluation sets).
    """
    if split not in _FILES:
        raise CourseError(f"unknown MNIST split {split!r}: use 'train' or 'test'")
    root = data_root(root)
    if uses_test_split(root, budget_name):
        test = MNIST(root, train=False, download=False, binarize=binarize,
                     binarize_seed=binarize_seed)
        if split == "train":
            rows = slice(0, TEST_SPLIT_TRAIN_SIZE)
            note = "MNIST test images 1-8,000 (8,000/2,000 split: no train split here)"
        else:
            rows = slice(TEST_SPLIT_TRAIN_SIZE, None)
            note = "MNIST test images 8,001-10,000 (8,000/2,000 split: held out)"
        if note not in _announced:
            _announced.add(note)
            print(f"[course data] using {note}")
        return test.keep(rows, note)
    if split == "train" and not split_available("train", root) and split_available("test", root):
        extra = (f"Only the test split is here. To train on its first 8,000 images and hold out "
                 f"the last 2,000, set {TEST_SPLIT_ENV}=1 (or `course train --test-split`); the "
                 "smoke budget does this by itself. ")
        if not download:
            raise MNISTNotFoundError(_missing_message("train", root, extra))
        try:
            return MNIST(root, train=True, download=True, binarize=binarize, binarize_seed=binarize_seed)
        except MNISTNotFoundError as err:
            raise MNISTNotFoundError(str(err).replace("To get them", extra + "To get them")) from None
    if not download and not split_available(split, root):
        raise MNISTNotFoundError(_missing_message(split, root))
    return MNIST(root, train=(split == "train"), download=download, binarize=binarize,
                 binarize_seed=binarize_seed)


def describe(dataset) -> str:
    """A one-line description of what a dataset really holds (for reports)."""
    return getattr(dataset, "description", type(dataset).__name__)


# -- fast batches ---------------------------------------------------------------
def as_tensors(dataset, device="cpu", limit: int | None = None):
    """All images (N x 1 x 28 x 28 float) and labels of an MNIST dataset, on ``device``.

    Keeping the whole set as one tensor (47 MB for 60k images) is much faster
    than a per-item ``DataLoader`` on a laptop, and lets a GPU keep it resident.
    Binarization is *not* applied here; ``BatchLoader`` does it per batch.
    """
    images = dataset.data[:limit].float().div(255).unsqueeze(1)
    if getattr(dataset, "binarize", None) == "fixed":
        images = dataset.fixed_binary[:limit].unsqueeze(1)
    labels = dataset.targets[:limit].long()
    return images.to(device), labels.to(device)


def training_tensors(device="cpu", limit: int | None = None, images=None, labels=None):
    """What a registered model trains on: ``(images, labels, description)``.

    ``mnist("train")`` (the first ``limit`` images) unless ``images`` are given; labels of
    zeros when none are given (an unconditional model never reads them).
    """
    description = "given tensors"
    if images is None:
        train_set = mnist("train")
        images, labels = as_tensors(train_set, device, limit=limit)
        description = describe(train_set)
        if limit:
            description += f" (the first {len(images):,} used)"
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    return images, labels, description


class BatchLoader:
    """Shuffled mini-batches from in-memory tensors, with dynamic binarization.

    Iterating yields ``(images, labels)`` on the tensors' device. A new epoch
    reshuffles; with ``binarize=True`` each batch gets a fresh Bernoulli draw.
    """

    def __init__(self, images, labels, batch_size=128, shuffle=True, binarize=False,
                 drop_last=False, seed=0):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.binarize, self.drop_last = (
            batch_size, shuffle, binarize, drop_last)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @classmethod
    def from_dataset(cls, dataset, batch_size=128, device="cpu", limit=None, **kwargs):
        images, labels = as_tensors(dataset, device, limit)
        kwargs.setdefault("binarize", getattr(dataset, "binarize", None) == "dynamic")
        return cls(images, labels, batch_size, **kwargs)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.images)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n)).to(self.images.device)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            if self.drop_last and len(rows) < self.batch_size:
                break
            images = self.images[rows]
            if self.binarize:
                images = torch.bernoulli(images)
            yield images, self.labels[rows]


def training_data_description(root=None, budget_name: str | None = None) -> str:
    """What ``mnist("train")`` would hold, without loading it (for configs and reports)."""
    if uses_test_split(root, budget_name):
        return "MNIST test images 1-8,000 (8,000/2,000 split)"
    return "MNIST train (60,000 images)"

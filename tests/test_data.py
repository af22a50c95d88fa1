import gzip
import shutil
import struct

import pytest
import torch

from course_utils import data
from course_utils.data import (
    BatchLoader,
    CorruptMNISTError,
    MNISTNotFoundError,
    as_tensors,
    mnist,
)


@pytest.fixture
def test_only_root(tmp_path, data_dir):
    """A writable data root holding only the real test split, copied."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.expected_files("test"):
        shutil.copy(data_dir / "MNIST" / "raw" / name, raw / name)
    return tmp_path


def test_images_are_float_in_unit_interval(test_only_root):
    ds = mnist("test", root=test_only_root, budget_name="full")
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert isinstance(label, int) and 0 <= label <= 9
    assert len(ds) == 10_000
    assert int(ds.targets[:10].tolist()[0]) == 7  # the first MNIST test digit is a 7


def test_smoke_budget_uses_the_8000_2000_split(test_only_root, capsys):
    train = mnist("train", root=test_only_root, budget_name="smoke")
    test = mnist("test", root=test_only_root, budget_name="smoke")
    assert len(train) == 8_000 and len(test) == 2_000
    full = mnist("test", root=test_only_root, budget_name="full")
    assert torch.equal(train.data, full.data[:8000]) and torch.equal(test.data, full.data[8000:])
    assert "8,000/2,000" in data.describe(train) and "held out" in data.describe(test)
    assert "8,000/2,000" in data.training_data_description(test_only_root, "smoke")


def test_split_is_announced(test_only_root, capsys):
    data._announced.clear()
    mnist("train", root=test_only_root, budget_name="smoke")
    assert "8,000/2,000 split" in capsys.readouterr().out


def test_other_budgets_need_the_train_split_or_an_explicit_request(test_only_root, monkeypatch):
    monkeypatch.delenv("COURSE_TEST_SPLIT", raising=False)
    with pytest.raises(MNISTNotFoundError) as err:
        mnist("train", root=test_only_root, download=False, budget_name="classroom")
    message = str(err.value)
    assert str(test_only_root / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte.gz" in message and "COURSE_TEST_SPLIT=1" in message
    monkeypatch.setenv("COURSE_TEST_SPLIT", "1")
    assert len(mnist("train", root=test_only_root, budget_name="classroom")) == 8_000


def test_missing_dataset_error_names_folder_files_and_remedy(tmp_path):
    with pytest.raises(MNISTNotFoundError) as err:
        mnist("test", root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "course data" in message


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", no_network)
    with pytest.raises(MNISTNotFoundError, match="download failed.*network unreachable"):
        mnist("test", root=tmp_path, download=True)


def test_partial_dataset_is_reported(test_only_root):
    (test_only_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        mnist("test", root=test_only_root, download=False)


def test_uncompressed_files_are_accepted(test_only_root):
    raw = test_only_root / "MNIST" / "raw"
    for name in data.expected_files("test"):
        with gzip.open(raw / name) as f:
            (raw / name.removesuffix(".gz")).write_bytes(f.read())
        (raw / name).unlink()
    assert len(mnist("test", root=test_only_root, budget_name="full")) == 10_000


def test_wrong_magic_number_is_reported(test_only_root):
    path = test_only_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 1234, 10_000) + bytes(10_000))
    with pytest.raises(CorruptMNISTError, match="magic number 1234"):
        mnist("test", root=test_only_root, budget_name="full")


def test_truncated_file_is_reported(test_only_root):
    path = test_only_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        content = f.read()
    with gzip.open(path, "wb") as f:
        f.write(content[:-100])
    with pytest.raises(CorruptMNISTError, match="wrong size"):
        mnist("test", root=test_only_root, budget_name="full")


def test_not_gzip_is_reported(test_only_root):
    (test_only_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(CorruptMNISTError, match="cannot be read"):
        mnist("test", root=test_only_root, budget_name="full")


def test_root_comes_from_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "env"))
    assert data.data_root() == (tmp_path / "env").resolve()
    assert data.data_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("COURSE_DATA_DIR")
    assert data.data_root() == data.DEFAULT_ROOT.resolve()


def test_dynamic_binarization_redraws(test_only_root):
    ds = mnist("test", root=test_only_root, binarize=True, budget_name="full")
    first, second = ds[0][0], ds[0][0]
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)  # grey pixels flip between draws


def test_fixed_binarization_is_seeded(test_only_root):
    a = mnist("test", root=test_only_root, binarize="fixed", binarize_seed=1, budget_name="full")
    b = mnist("test", root=test_only_root, binarize="fixed", binarize_seed=1, budget_name="full")
    c = mnist("test", root=test_only_root, binarize="fixed", binarize_seed=2, budget_name="full")
    assert torch.equal(a[5][0], a[5][0]) and torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], c[5][0])
    held_out = mnist("test", root=test_only_root, binarize="fixed", binarize_seed=1,
                     budget_name="smoke")
    assert torch.equal(held_out[0][0], a[8000][0])  # the split keeps the fixed draw


def test_batch_loader_covers_every_image_once(test_only_root):
    ds = mnist("test", root=test_only_root, budget_name="smoke")
    loader = BatchLoader.from_dataset(ds, batch_size=300, seed=1)
    assert len(loader) == 7
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels.sort().values, ds.targets.sort().values)
    images, _ = as_tensors(ds)
    assert images.shape == (2000, 1, 28, 28)
    first_epoch = next(iter(loader))[1]
    assert not torch.equal(first_epoch, next(iter(loader))[1])  # reshuffled per epoch


def test_batch_loader_binarizes_each_batch(test_only_root):
    ds = mnist("test", root=test_only_root, binarize=True, budget_name="smoke")
    loader = BatchLoader.from_dataset(ds, batch_size=64, shuffle=False)
    a, b = next(iter(loader))[0], next(iter(loader))[0]
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)


def test_a_failed_download_names_its_own_split_with_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    from course_utils.data import MNIST, MNISTNotFoundError

    asked = []

    def offline(self):
        asked.extend(name for name, _ in self.resources)
        raise RuntimeError("Error downloading " + self.resources[0][0])

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(MNISTNotFoundError) as info:
        MNIST(tmp_path, train=False, download=True)
    assert asked == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    text = str(info.value)
    assert "t10k-images" in text and "train-images" not in text
    assert "no internet connection?" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__

"""Every plotting helper returns a Figure with the expected axes and artists."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from course_utils.plotting import (  # noqa: E402
    image_grid,
    interpolation_strip,
    latent_scatter,
    loss_curves,
    reconstruction_pairs,
    save_figure,
)
from course_utils.training import History  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(ax):
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("images", [
    torch.rand(10, 1, 28, 28),
    np.random.default_rng(0).random((10, 28, 28)),
    torch.rand(10, 784),
    torch.rand(10, 1, 28, 28, requires_grad=True),
])
def test_image_grid_grey_layouts(images):
    fig = image_grid(images, nrow=4, title="digits")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1
    mosaic = fig.axes[0].images[0].get_array()
    assert mosaic.shape[0] > 3 * 28 and mosaic.shape[1] > 4 * 28  # 3 rows of 4
    assert fig.axes[0].get_title() == "digits"


def test_image_grid_colour_labels_and_errors():
    fig = image_grid(torch.rand(6, 3, 16, 16), nrow=3, labels=torch.arange(6))
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape[-1] == 3
    assert texts(ax) == [str(i) for i in range(6)]
    fig = image_grid(torch.rand(2, 1, 28, 28), labels=torch.tensor([0.5, 2.0]))
    assert texts(fig.axes[0]) == ["0.5", "2"]
    with pytest.raises(ValueError, match="labels"):
        image_grid(torch.rand(4, 1, 28, 28), labels=[1, 2])
    with pytest.raises(ValueError):
        image_grid(torch.rand(4, 2, 28, 28))
    fig, ax = plt.subplots(1, 2)
    assert image_grid(torch.rand(2, 1, 28, 28), ax=ax[1]) is fig  # draws into a given axes


def test_interpolation_strip_has_alpha_captions():
    fig = interpolation_strip(torch.rand(5, 1, 28, 28))
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.images) == 1
    assert texts(ax) == ["α=0.00", "α=0.25", "α=0.50", "α=0.75", "α=1.00"]
    fig = interpolation_strip(np.random.rand(3, 28, 28), alphas=[0.0, 0.3, 1.0])
    assert texts(fig.axes[0])[1] == "α=0.30"


def test_reconstruction_pairs_two_labelled_rows():
    x = torch.rand(12, 1, 28, 28)
    fig = reconstruction_pairs(x, x.flatten(1), n=6)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.images) == 1
    mosaic = ax.images[0].get_array()
    assert 2 * 28 < mosaic.shape[0] < 3 * 28 and 6 * 28 < mosaic.shape[1] < 7 * 28
    assert [t.get_text() for t in ax.get_yticklabels()] == ["original", "reconstruction"]


def make_history(with_logs=True):
    h = History()
    rng = np.random.default_rng(0)
    for step in range(1, 201):
        extra = {"kl": float(rng.random()), "recon": float(rng.random())} if with_logs else {}
        h.record(step, float(1 / step + 0.1 * rng.random()), extra)
        if step % 50 == 0:
            h.epoch_ends.append(step)
    return h


def test_loss_curves_history_with_logs_and_epochs():
    fig = loss_curves(make_history(), title="VAE", logy=True)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # loss + one axes per logged series
    main = fig.axes[0]
    assert main.get_title() == "VAE" and main.get_yscale() == "log"
    dotted = [line for line in main.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 4  # one per epoch end
    assert len(main.lines) == 2 + 4  # raw + smoothed + epoch lines
    assert make_history().plot("from History.plot").axes[0].get_title() == "from History.plot"


def test_loss_curves_history_without_logs_and_train_result():
    from types import SimpleNamespace

    fig = loss_curves(SimpleNamespace(history=make_history(with_logs=False)), smooth=0)
    assert len(fig.axes) == 1
    assert len([ln for ln in fig.axes[0].lines if ln.get_linestyle() != ":"]) == 1


def test_loss_curves_dict_list_and_numpy():
    fig = loss_curves({"train": [3, 2, 1.5, 1.2], "test": np.array([3.1, 2.4, 2.0, 1.9])},
                      title="per epoch")
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"train", "test"}
    fig = loss_curves(torch.linspace(2, 0.1, 300), smooth=10, logy=True)
    assert len(fig.axes[0].lines) == 2  # raw + running mean


def test_latent_scatter_2d_with_labels():
    z, labels = torch.randn(300, 2), torch.randint(0, 10, (300,))
    fig = latent_scatter(z, labels, title="AE latent")
    assert len(fig.axes) == 2  # the scatter and its colour bar
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 300
    assert "PCA" not in ax.get_xlabel()


def test_latent_scatter_projects_5d_and_subsamples():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    fig = latent_scatter(z, rng.integers(0, 10, 1000), max_points=400)
    ax = fig.axes[0]
    assert "PC 1" in ax.get_xlabel() and "5-d" in ax.get_xlabel() and "PC 2" in ax.get_ylabel()
    assert "PCA" in ax.get_title()
    points = ax.collections[0].get_offsets()
    assert len(points) == 400
    # the first principal component carries the variance of the first coordinate
    assert np.var(points[:, 0]) > 3 * np.var(points[:, 1])
    fig = latent_scatter(torch.randn(50, 3))  # no labels: no colour bar
    assert len(fig.axes) == 1


def test_save_figure(tmp_path):
    fig = image_grid(torch.rand(4, 1, 28, 28))
    path = save_figure(fig, tmp_path / "sub" / "grid.png")
    assert path.exists() and path.stat().st_size > 1000

"""FID / KID maths, the classifier helpers, and a short real training run."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from course_utils import metrics
from course_utils.metrics import (
    MNISTFeatureNet,
    accuracy,
    class_histogram_entropy,
    classifier_features,
    classifier_score,
    confident_fraction,
    fid,
    frechet_distance,
    kid,
    random_affine,
)
from course_utils.runtime import CourseError


def random_spd(d, generator, scale=1.0):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def random_orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


# -- Fréchet distance -------------------------------------------------------------------
def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    # diagonal: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got.dtype == torch.float64 and got.ndim == 0
    assert float(got) == pytest.approx(float(expected), rel=1e-10)


def test_frechet_distance_commuting_covariances_and_1d():
    g = torch.Generator().manual_seed(1)
    q = random_orthogonal(5, g)
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.2, torch.rand(
        5, generator=g, dtype=torch.float64) + 0.2
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T  # share eigenvectors: commute
    mu = torch.zeros(5)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert float(frechet_distance(mu, s1, mu, s2)) == pytest.approx(float(expected), rel=1e-9)
    # 1-d Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    d1 = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]),
                          torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert float(d1) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_zero_for_identical_and_symmetric():
    g = torch.Generator().manual_seed(2)
    s1, s2 = random_spd(8, g), random_spd(8, g, scale=3.0)
    mu1, mu2 = torch.randn(8, generator=g), torch.randn(8, generator=g)
    assert float(frechet_distance(mu1, s1, mu1, s1)) == pytest.approx(0.0, abs=1e-9)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert float(d12) > 0
    assert float(d12) == pytest.approx(float(d21), rel=1e-10)


def denman_beavers_sqrtm(a: np.ndarray, iterations: int = 60) -> np.ndarray:
    """A^{1/2} of a (non-symmetric) matrix with positive eigenvalues, by the
    Denman-Beavers iteration: Y <- (Y + Z^-1)/2, Z <- (Z + Y^-1)/2, Y -> A^{1/2}."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iterations):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_frechet_distance_matches_brute_force_sqrtm():
    g = torch.Generator().manual_seed(3)
    s1, s2 = random_spd(7, g), random_spd(7, g, scale=0.5)
    mu1, mu2 = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(2))
    root = denman_beavers_sqrtm((s1 @ s2).numpy())  # sqrtm of the non-symmetric product
    assert np.allclose(root @ root, (s1 @ s2).numpy(), atol=1e-10)
    expected = (float(((mu1 - mu2) ** 2).sum()) + float(s1.trace() + s2.trace())
                - 2 * np.trace(root))
    got = frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())  # numpy works too
    assert float(got) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariances_and_bad_shapes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    singular = x.T @ x  # rank 3
    assert float(frechet_distance(torch.zeros(6), singular, torch.zeros(6), singular)) == \
        pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# -- FID and KID on samples ---------------------------------------------------------------
def gaussian_features(n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def test_fid_small_for_same_distribution_large_for_shifted():
    a, b = gaussian_features(2000, 16, 0.0, 0), gaussian_features(2000, 16, 0.0, 1)
    shifted = gaussian_features(2000, 16, 0.5, 2)
    same, different = float(fid(a, b)), float(fid(a, shifted))
    assert same < 0.15
    assert different == pytest.approx(16 * 0.25, rel=0.15)  # ||delta mu||^2 = 16 * 0.5^2
    assert float(fid(a, a)) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError):
        fid(a, a[:, :8])


def test_kid_zero_for_same_distribution_positive_for_different():
    a, b = gaussian_features(1000, 16, 0.0, 0), gaussian_features(1000, 16, 0.0, 1)
    shifted = gaussian_features(1000, 16, 0.5, 2)
    same, same_std = kid(a, b, num_subsets=20, subset_size=500, return_std=True)
    different, diff_std = kid(a, shifted, num_subsets=20, subset_size=500, return_std=True)
    assert abs(float(same)) < 3 * float(same_std) + 1e-3
    assert float(different) > 0.05 and float(different) > 10 * float(diff_std)
    # a subset larger than the sets is clipped; the same seed gives the same answer
    assert float(kid(a, shifted, num_subsets=3, subset_size=10_000)) == pytest.approx(
        float(kid(a, shifted, num_subsets=3, subset_size=10_000)))


def test_kid_matches_direct_formula_on_one_subset():
    a, b = gaussian_features(40, 5, 0.0, 3), gaussian_features(40, 5, 0.3, 4)
    d, m = 5, 40
    k = lambda x, y: (x.double() @ y.double().T / d + 1) ** 3
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    off = lambda mat: (mat.sum() - mat.diagonal().sum()) / (m * (m - 1))
    expected = off(kxx) + off(kyy) - 2 * kxy.mean()
    # a subset of all 40 vectors is a permutation of them: the estimate is exact
    assert float(kid(a, b, num_subsets=1, subset_size=40)) == pytest.approx(float(expected),
                                                                           rel=1e-6)


# -- the classifier helpers on a hand-made classifier ---------------------------------------
class LookupClassifier(nn.Module):
    """Returns fixed logits: image i is recognised by its first pixel, i / 100."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        index = (x.flatten(1)[:, 0] * 100).round().long()
        return self.table[index]


def lookup_images(n):
    images = torch.zeros(n, 1, 28, 28)
    images[:, 0, 0, 0] = torch.arange(n) / 100
    return images


def peaked_logits(cls, p):
    """Logits whose softmax puts p on class ``cls`` and (1 - p) / 9 on each other class."""
    probs = torch.full((10,), (1 - p) / 9)
    probs[cls] = p
    return probs.log()


def test_confident_fraction_and_class_entropy_exact():
    ps = [0.95, 0.99, 0.5, 0.3, 0.92, 0.89, 0.999, 0.4]
    classes = [0, 0, 1, 2, 3, 3, 3, 3]
    table = torch.stack([peaked_logits(c, p) for c, p in zip(classes, ps, strict=True)])
    clf, images = LookupClassifier(table), lookup_images(8)
    # max probabilities >= 0.9: 0.95, 0.99, 0.92, 0.999 -> 4 of 8
    assert confident_fraction(clf, images, threshold=0.9, batch_size=3) == pytest.approx(0.5)
    assert confident_fraction(clf, images, threshold=0.0) == pytest.approx(1.0)
    # predicted classes 0,0,1,2,3,3,3,3 -> histogram (2, 1, 1, 4) / 8
    h = np.array([2, 1, 1, 4]) / 8
    assert class_histogram_entropy(clf, images, batch_size=3) == pytest.approx(
        float(-(h * np.log(h)).sum()), rel=1e-9)
    assert accuracy(clf, images, torch.tensor(classes)) == pytest.approx(1.0)
    assert accuracy(clf, images, torch.zeros(8, dtype=torch.long)) == pytest.approx(2 / 8)


def test_class_entropy_extremes_and_classifier_score():
    ten = LookupClassifier(torch.stack([peaked_logits(c, 0.999999) for c in range(10)]))
    assert class_histogram_entropy(ten, lookup_images(10)) == pytest.approx(math.log(10))
    assert classifier_score(ten, lookup_images(10)) == pytest.approx(10, rel=1e-3)
    same = LookupClassifier(torch.stack([peaked_logits(7, 0.99)] * 5))
    assert class_histogram_entropy(same, lookup_images(5)) == pytest.approx(0.0, abs=1e-12)
    assert classifier_score(same, lookup_images(5)) == pytest.approx(1.0)


def test_model_helpers_restore_training_mode_and_warn_on_range():
    net = MNISTFeatureNet().train()
    x = torch.rand(7, 1, 28, 28)
    feats = classifier_features(net, x, batch_size=3)
    assert feats.shape == (7, 128) and net.training
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        confident_fraction(net, x * 2 - 1)


# -- the network ----------------------------------------------------------------------------
def test_feature_net_shapes_and_inputs():
    net = MNISTFeatureNet().eval()
    x = torch.rand(5, 1, 28, 28)
    assert net(x).shape == (5, 10)
    assert net.features(x).shape == (5, net.feature_dim) == (5, 128)
    assert torch.allclose(net(x.view(5, 784)), net(x), atol=1e-6)
    assert torch.allclose(net(x[:, 0]), net(x), atol=1e-6)
    with pytest.raises(ValueError, match="28"):
        net(torch.rand(2, 1, 32, 32))
    config = metrics.classifier_config("smoke")
    a, b = metrics.build_classifier(config), metrics.build_classifier(config)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # seeded: the same initial weights every time


def test_random_affine_identity_and_shapes():
    x = torch.rand(4, 1, 28, 28)
    same = random_affine(x, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0)
    assert torch.allclose(same, x, atol=1e-5)
    moved = random_affine(x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    again = random_affine(x, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)


def test_classifier_config_names_the_data_and_budget():
    smoke, classroom = metrics.classifier_config("smoke"), metrics.classifier_config("classroom")
    assert smoke["steps"] < classroom["steps"]
    assert "data" in smoke and smoke["budget"] == "smoke"
    from course_utils.checkpoints import config_hash

    assert config_hash(smoke) != config_hash(classroom)


# -- a short training run on the real data (the smoke recipe) ---------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    config = metrics.classifier_config("smoke")
    model = metrics.build_classifier(config)
    figures = metrics.train_classifier(model, config, "cpu", progress=False)
    return config, model, figures


def test_smoke_training_reaches_sensible_accuracy(trained):
    config, model, figures = trained
    assert figures["train_steps"] == config["steps"]
    result = metrics.evaluate_classifier(model, config, "cpu")
    print(f"smoke classifier: {100 * result['test_accuracy']:.2f} % on {result['test_data']} "
          f"after {figures['train_seconds']} s")
    assert result["test_accuracy"] > 0.95
    assert not model.training


def test_sample_quality_real_vs_noise(trained):
    _, model, _ = trained
    from course_utils.data import as_tensors, mnist

    images, _ = as_tensors(mnist("test"), limit=2000)
    real_a, real_b = images[:1000], images[1000:]
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    good = metrics.sample_quality(model, real_a, real_b, kid_subsets=10, kid_subset_size=500)
    bad = metrics.sample_quality(model, noise, real_b, kid_subsets=10, kid_subset_size=500)
    assert set(good) >= {"fid", "kid", "confident_fraction", "class_entropy"}
    assert good["fid"] < 0.1 * bad["fid"]
    assert bad["kid"] > 10 * max(good["kid"], 1e-4)
    assert good["confident_fraction"] > 0.9
    assert good["class_entropy"] > 2.2  # close to log 10 = 2.303
    # the one-pass shortcut agrees with the stand-alone helpers
    assert good["confident_fraction"] == pytest.approx(confident_fraction(model, real_a))
    assert good["class_entropy"] == pytest.approx(class_histogram_entropy(model, real_a))


def test_load_feature_net_uses_the_verified_cache(trained, tmp_path, monkeypatch, capsys):
    config, model, figures = trained
    from course_utils.checkpoints import save_checkpoint

    monkeypatch.setenv("COURSE_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_loaded", {})
    with pytest.raises(CourseError, match="course train classifier"):
        metrics.load_feature_net("cpu", train_if_missing=False, budget_name="smoke")
    save_checkpoint(metrics.CHECKPOINT_NAME, model, config, {**figures, "test_accuracy": 0.99,
                                                             "test_data": "held out"})
    loaded = metrics.load_feature_net("cpu", train_if_missing=False, budget_name="smoke")
    assert "loaded from the checkpoint cache" in capsys.readouterr().out
    assert isinstance(loaded, MNISTFeatureNet) and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_load_feature_net_trains_and_caches_when_missing(tmp_path, monkeypatch, capsys, data_dir):
    real_config = metrics.classifier_config

    def tiny_config(budget_name=None, root=None):  # the real recipe, 10 steps only
        return {**real_config(budget_name, root), "steps": 10}

    monkeypatch.setattr(metrics, "classifier_config", tiny_config)
    monkeypatch.setattr(metrics, "_loaded", {})
    monkeypatch.setenv("COURSE_CHECKPOINT_DIR", str(tmp_path))
    net = metrics.load_feature_net("cpu", budget_name="smoke")
    out = capsys.readouterr().out
    assert "trained in" in out and "accuracy on" in out
    assert isinstance(net, MNISTFeatureNet) and not net.training
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 1
    assert len(list(tmp_path.glob("classifier-*.json"))) == 1
    again = metrics.load_feature_net("cpu", budget_name="smoke")  # remembered in-process
    assert again is not net and torch.equal(again.head[1].weight, net.head[1].weight)


# -- precision / recall on k-NN manifolds, memorisation -----------------------------------
def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    assert metrics.knn_radii(x, k=1).tolist() == [1.0, 1.0, 0.0, 0.0]  # the duplicate counts
    assert metrics.knn_radii(x, k=2).tolist() == [3.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        metrics.knn_radii(x, k=4)


def test_precision_recall_identical_and_disjoint_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    assert metrics.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    far = torch.randn(200, 8, generator=g) + 100.0
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_collapsed_generator():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 5, generator=g)
    collapsed = real[7].expand(100, 5).clone()  # every sample is the same real point
    precision, recall = metrics.precision_recall(real, collapsed, k=3)
    assert precision == 1.0  # each sample looks real...
    assert recall == pytest.approx(1 / 400)  # ...but it covers one real point (its radius is 0)


def test_precision_recall_hand_computed_1d_case():
    real = torch.tensor([[0.0], [1.0], [3.0]])
    fake = torch.tensor([[0.5], [0.7], [10.0]])
    # k = 1. Real radii 1, 1, 2: balls [-1, 1], [0, 2], [1, 5] hold 0.5 and 0.7, not 10.
    # Fake radii 0.2, 0.2, 9.3: balls [0.3, 0.7], [0.5, 0.9], [0.7, 19.3] hold 1 and 3, not 0.
    # (the outlier at 10 gets a huge ball: recall is generous to outliers, a known weakness)
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.precision_recall(real, torch.zeros(3, 2), k=1)


def test_precision_recall_tell_quality_from_coverage():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 2, generator=g)
    half = real[real[:, 0] > 0][:200] + 0.01 * torch.randn(200, 2, generator=g)  # half the data
    noisy = 5.0 * torch.randn(500, 2, generator=g)  # covers everything, mostly off the data
    p_half, r_half = metrics.precision_recall(real, half)
    p_noisy, r_noisy = metrics.precision_recall(real, noisy)
    assert p_half > 0.9 and r_half < 0.7
    assert p_noisy < 0.4 and r_noisy > 0.9


def test_memorisation_check_spots_copies():
    g = torch.Generator().manual_seed(3)
    train = torch.rand(300, 1, 6, 6, generator=g)
    held_out = torch.rand(100, 1, 6, 6, generator=g)
    copies = train[:80] + 0.001 * torch.randn(80, 1, 6, 6, generator=g)
    fresh = torch.rand(80, 1, 6, 6, generator=g)
    copied = metrics.memorisation_check(copies, train, held_out)
    honest = metrics.memorisation_check(fresh, train, held_out)
    assert copied["ratio"] < 0.05 and copied["share_closer_than_quantile"] == 1.0
    assert torch.equal(copied["nearest_train_index"], torch.arange(80))
    assert 0.8 < honest["ratio"] < 1.25 and honest["share_closer_than_quantile"] < 0.1
    assert honest["n_samples"] == 80 and honest["n_held_out"] == 100
    distances, indices = metrics.nearest_neighbours(train[5:6], train)
    assert distances.item() == 0 and indices.item() == 5

"""course_utils.autoencoders: models, losses, corruptions, penalties, analysis tools, registry hooks."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from course_utils import autoencoders as ae


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 5, 32])
def test_mlp_autoencoder_shapes_and_range(k):
    model = ae.MLPAutoencoder(k, hidden=(64, 32))
    x = torch.rand(7, 1, 28, 28, generator=gen())
    h = model.encode(x)
    x_hat = model.decode(h)
    assert h.shape == (7, k) and x_hat.shape == x.shape
    assert torch.equal(model(x), x_hat)
    assert 0 <= x_hat.min() and x_hat.max() <= 1  # sigmoid output


def test_mlp_decoder_starts_at_the_mean_intensity():
    model = ae.MLPAutoencoder(8, hidden=(16,))
    last = model.decoder[-3]
    assert isinstance(last, nn.Linear)
    assert torch.allclose(torch.sigmoid(last.bias), torch.full_like(last.bias, ae.MEAN_PIXEL))


def test_linear_autoencoder_is_affine_and_affine_maps_recover_it():
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(3, linear=True)
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid)) for m in model.modules())
    x = torch.rand(4, 1, 28, 28, generator=gen())
    W_f, b_f, W_g, b_g = ae.affine_maps(model)
    assert W_f.shape == (3, 784) and W_g.shape == (784, 3) and b_f.shape == (3,) and b_g.shape == (784,)
    expected = (x.flatten(1) @ W_f.T + b_f) @ W_g.T + b_g
    assert torch.allclose(model(x).flatten(1), expected, atol=1e-5)
    deep = ae.MLPAutoencoder(3, hidden=(10,), linear=True)  # still affine with a hidden layer
    W_f, b_f, W_g, b_g = ae.affine_maps(deep)
    assert torch.allclose(deep(x).flatten(1), (x.flatten(1) @ W_f.T + b_f) @ W_g.T + b_g, atol=1e-5)


def test_code_activations():
    x = torch.rand(5, 1, 28, 28, generator=gen())
    relu = ae.MLPAutoencoder(6, hidden=(), code_activation="relu").encode(x)
    sig = ae.MLPAutoencoder(6, hidden=(), code_activation="sigmoid").encode(x)
    assert relu.min() >= 0 and 0 < sig.min() and sig.max() < 1
    with pytest.raises(ValueError):
        ae.MLPAutoencoder(6, code_activation="tanh")
    with pytest.raises(ValueError):
        ae.MLPAutoencoder(6, linear=True, code_activation="relu")


def test_conv_autoencoder_is_the_seed_network():
    from course_utils.convolution import SeedConvAutoencoder

    assert ae.ConvAutoencoder is SeedConvAutoencoder
    model = ae.ConvAutoencoder()
    x = torch.rand(2, 1, 28, 28, generator=gen())
    assert model.encode(x).shape == (2, 8, 1, 1)
    assert model(x).shape == (2, 1, 28, 28)


# -- losses, corruptions, penalties -------------------------------------------------------------
def test_reconstruction_loss_sums_pixels_and_averages_the_batch():
    x, x_hat = torch.rand(6, 1, 28, 28, generator=gen(1)), torch.rand(6, 1, 28, 28, generator=gen(2))
    by_hand = sum(((x[n] - x_hat[n]) ** 2).sum() for n in range(6)) / 6
    assert torch.allclose(ae.reconstruction_loss(x, x_hat), by_hand)
    assert torch.allclose(ae.reconstruction_loss(x, x_hat), 784 * F.mse_loss(x_hat, x))
    assert torch.allclose(ae.reconstruction_mse(x, x_hat), F.mse_loss(x_hat, x))


def test_masking_noise_drops_with_probability_nu_and_keeps_values():
    ones = torch.ones(400, 500)
    for nu in (0.1, 0.5, 0.8):
        out = ae.masking_noise(ones, nu, generator=gen())
        assert abs((out == 0).float().mean().item() - nu) < 0.01
        assert set(out.unique().tolist()) <= {0.0, 1.0}  # kept pixels are not rescaled
    x = torch.rand(3, 1, 28, 28, generator=gen(1)) + 0.01
    assert torch.equal(ae.masking_noise(x, 0.0), x)
    assert torch.equal(ae.masking_noise(x, 1.0), torch.zeros_like(x))
    assert torch.equal(ae.masking_noise(x, 0.4, generator=gen(3)), ae.masking_noise(x, 0.4, generator=gen(3)))
    with pytest.raises(ValueError):
        ae.masking_noise(x, 1.5)


def test_gaussian_noise_std_and_clipping():
    grey = torch.full((400, 500), 0.5)
    noise = ae.gaussian_noise(grey, 0.1, generator=gen()) - grey
    assert abs(noise.std().item() - 0.1) < 0.002 and abs(noise.mean().item()) < 0.002
    x = torch.rand(4, 1, 28, 28, generator=gen(1))
    out = ae.gaussian_noise(x, 2.0, generator=gen(2))
    assert out.min() >= 0 and out.max() <= 1
    assert ae.gaussian_noise(x, 2.0, generator=gen(2), clip=False).max() > 1
    assert torch.equal(out, ae.gaussian_noise(x, 2.0, generator=gen(2)))


def test_sparse_penalty():
    h = torch.randn(8, 5, generator=gen())
    assert torch.allclose(ae.sparse_penalty(h, 0.3), 0.3 * h.abs().sum(1).mean())
    assert torch.allclose(ae.sparse_penalty(torch.cat([h, h]), 0.3), ae.sparse_penalty(h, 0.3))
    assert torch.allclose(ae.sparse_penalty(h.view(8, 5, 1, 1), 0.3), ae.sparse_penalty(h, 0.3))


def test_contractive_penalty_matches_the_sigmoid_closed_form_and_trains():
    torch.manual_seed(0)
    layer = nn.Linear(784, 12)
    encoder = nn.Sequential(nn.Flatten(), layer, nn.Sigmoid())
    x = torch.rand(9, 1, 28, 28, generator=gen())
    autograd_value = ae.contractive_penalty(encoder, x, 0.4)
    closed = ae.contractive_penalty_sigmoid(layer.weight, layer.bias, x, 0.4)
    assert torch.allclose(autograd_value, closed, rtol=1e-5)
    (g_auto,) = torch.autograd.grad(autograd_value, layer.weight)
    (g_closed,) = torch.autograd.grad(closed, layer.weight)
    assert torch.allclose(g_auto, g_closed, rtol=1e-4, atol=1e-9)
    frozen = ae.contractive_penalty(encoder, x, 0.4, create_graph=False)
    assert not frozen.requires_grad and torch.allclose(frozen, closed, rtol=1e-5)


def test_contractive_penalty_is_the_jacobian_frobenius_norm():
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(4, hidden=(16,))
    x = torch.rand(5, 1, 28, 28, generator=gen())
    jac = torch.func.vmap(torch.func.jacrev(lambda one: model.encode(one[None])[0]))(x)
    expected = jac.pow(2).flatten(1).sum(1).mean()
    assert torch.allclose(ae.contractive_penalty(model.encode, x, 1.0), expected, rtol=1e-4)


# -- latent space ------------------------------------------------------------------------------
def test_interpolate_endpoints_midpoint_and_shapes():
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(3, hidden=(8,))
    x0, x1 = torch.rand(1, 28, 28, generator=gen(1)), torch.rand(1, 28, 28, generator=gen(2))
    strip = ae.interpolate(model.encode, model.decode, x0, x1, 5)
    assert strip.shape == (5, 1, 28, 28)
    with torch.no_grad():
        h0, h1 = model.encode(x0[None]), model.encode(x1[None])
        assert torch.allclose(strip[0], model.decode(h0)[0], atol=1e-6)
        assert torch.allclose(strip[-1], model.decode(h1)[0], atol=1e-6)
        assert torch.allclose(strip[2], model.decode((h0 + h1) / 2)[0], atol=1e-6)
    batch0, batch1 = torch.rand(4, 1, 28, 28, generator=gen(3)), torch.rand(4, 1, 28, 28, generator=gen(4))
    batched = ae.interpolate(model.encode, model.decode, batch0, batch1, 6)
    assert batched.shape == (6, 4, 1, 28, 28)
    single = ae.interpolate(model.encode, model.decode, batch0[2], batch1[2], 6)
    assert torch.allclose(batched[:, 2], single, atol=1e-6)
    conv = ae.ConvAutoencoder()  # codes of shape (N, 8, 1, 1)
    assert ae.interpolate(conv.encode, conv.decode, x0, x1, 3).shape == (3, 1, 28, 28)
    pixels = ae.pixel_interpolate(x0, x1, 3)
    assert torch.allclose(pixels[1], (x0 + x1) / 2)


def test_gaussian_fit_reproduces_mean_and_covariance():
    codes = torch.randn(5000, 3, generator=gen()) @ torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 0, 0.5]]) + 3
    fit = ae.GaussianFit.fit(codes)
    assert torch.allclose(fit.cov, torch.cov(codes.T), atol=1e-4)
    samples = fit.sample(20000, generator=gen(1))
    assert torch.allclose(samples.mean(0), fit.mean, atol=0.05)
    assert torch.allclose(torch.cov(samples.T), fit.cov, atol=0.1)


def test_latent_explorer_redraws_when_a_slider_moves():
    pytest.importorskip("ipywidgets")
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(2, hidden=(8,))
    image = ae.decode_latent_point(model.decode, [0.5, -1.0])
    assert image.shape == (28, 28)
    with torch.no_grad():
        assert torch.allclose(image, model.decode(torch.tensor([[0.5, -1.0]]))[0, 0])
    codes, labels = torch.randn(100, 2, generator=gen()), torch.randint(0, 10, (100,), generator=gen())
    fig = ae.latent_explorer_figure(model.decode, (0.0, 0.0), codes, labels, z_range=(-3, 3))
    assert len(fig.axes) >= 2
    box = ae.latent_explorer(model.decode, ((-2, 2), (-1, 1)), codes=codes, labels=labels)
    before = box.image.value
    assert before[:4] == b"\x89PNG"
    box.sliders[0].value = 1.5
    assert box.image.value != before
    with pytest.raises(ValueError):
        ae.latent_explorer(model.decode, (2, -2))


# -- PCA and principal angles ------------------------------------------------------------------
def test_pca_subspace_is_the_top_eigenspace():
    X = torch.randn(500, 6, generator=gen()) * torch.tensor([4.0, 3, 2, 1, 0.5, 0.1]) + 5
    pca = ae.pca_subspace(X, 3)
    U = pca.components
    assert U.shape == (6, 3) and torch.allclose(U.T @ U, torch.eye(3, dtype=U.dtype), atol=1e-10)
    assert torch.all(pca.variances[:-1] >= pca.variances[1:])
    _, _, vh = torch.linalg.svd((X - X.mean(0)).double(), full_matrices=False)
    assert torch.allclose(U @ U.T, vh[:3].T @ vh[:3], atol=1e-8)
    recon = pca.reconstruct(X)
    assert recon.dtype == X.dtype and recon.shape == X.shape
    images = torch.rand(20, 1, 28, 28, generator=gen(1))
    assert ae.pca_subspace(images, 4).reconstruct(images).shape == images.shape


def test_subspace_angles_known_values_and_basis_invariance():
    tilt = math.radians(30)
    plane = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    tilted = torch.tensor([[1.0, 0.0], [0.0, math.cos(tilt)], [0.0, math.sin(tilt)]])
    assert torch.allclose(ae.subspace_angles(plane, tilted), torch.tensor([0.0, tilt], dtype=torch.float64),
                          atol=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen(), dtype=torch.float64))
    theta = torch.tensor([1e-7, 0.3, 1.5], dtype=torch.float64)  # a tiny angle: arccos alone would lose it
    A, B = Q[:, :3], Q[:, :3] * torch.cos(theta) + Q[:, 3:6] * torch.sin(theta)
    mix = torch.tensor([[1.0, 2, 0], [0, 1, 1], [3, 0, 1]], dtype=torch.float64)
    assert torch.allclose(ae.subspace_angles(A @ mix, B), theta, atol=1e-12)
    assert ae.subspace_angles(A, Q[:, :5]).shape == (3,)  # different dimensions: min(p, q) angles
    assert torch.allclose(ae.projection_matrix(A @ mix), A @ A.T, atol=1e-12)


def test_a_trained_linear_autoencoder_spans_the_pca_subspace():
    """The theorem of the lecture, on synthetic data: 3 strong directions in R^20."""
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen()))
    X = (torch.randn(2000, 20, generator=gen(1)) * torch.tensor([3.0, 2.0, 1.5] + [0.2] * 17)) @ Q.T
    X = X - X.mean(0)
    W_f = nn.Parameter(0.1 * torch.randn(3, 20))
    W_g = nn.Parameter(0.1 * torch.randn(20, 3))
    optimizer = torch.optim.Adam([W_f, W_g], lr=0.02)
    for _ in range(1500):
        optimizer.zero_grad()
        ((X @ W_f.T @ W_g.T - X) ** 2).sum(1).mean().backward()
        optimizer.step()
    angles = ae.subspace_angles(W_g.detach(), ae.pca_subspace(X, 3).components)
    assert torch.rad2deg(angles).max() < 0.5
    gram = (W_g.T @ W_g).detach()
    assert not torch.allclose(gram, torch.eye(3), atol=0.05)  # the same subspace, not the PCA basis


# -- probe, anomaly scores, ROC ----------------------------------------------------------------
def test_linear_probe_separable_and_deterministic():
    centres = torch.randn(3, 5, generator=gen()) * 5
    y = torch.arange(60) % 3
    X = centres[y] + 0.1 * torch.randn(60, 5, generator=gen(1))
    acc = ae.linear_probe(X[:30], y[:30], X[30:], y[30:])
    assert acc == 1.0 and isinstance(acc, float)
    noise = torch.randn(60, 5, generator=gen(2))
    assert ae.linear_probe(noise[:30], y[:30], noise[30:], y[30:]) == \
        ae.linear_probe(noise[:30], y[:30], noise[30:], y[30:])


def test_anomaly_scores_are_per_image_squared_errors():
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(4, hidden=(8,))
    x = torch.rand(11, 1, 28, 28, generator=gen())
    scores = ae.anomaly_scores(model, x, batch_size=4)
    with torch.no_grad():
        expected = ((x - model(x)) ** 2).sum(dim=(1, 2, 3))
    assert scores.shape == (11,) and torch.allclose(scores, expected, rtol=1e-5)
    assert not scores.requires_grad


def test_roc_auc_matches_the_pairwise_definition_with_ties():
    s0 = torch.tensor([1.0, 2.0, 2.0, 3.0])
    s1 = torch.tensor([2.0, 3.0, 4.0])
    assert ae.roc_auc(s0, s1) == pytest.approx((1 + 1 + 3 + 0.5 + 4) / 12)
    a = torch.randint(0, 20, (300,), generator=gen()).float()
    b = torch.randint(5, 25, (200,), generator=gen(1)).float()
    pairwise = ((b[:, None] > a[None]).double().mean() + 0.5 * (b[:, None] == a[None]).double().mean()).item()
    assert ae.roc_auc(a, b) == pytest.approx(pairwise, abs=1e-12)
    assert ae.roc_auc(b, a) == pytest.approx(1 - pairwise, abs=1e-12)
    c, d = torch.randn(100, generator=gen(2)), torch.randn(80, generator=gen(3)) + 1  # no ties
    fpr, tpr = ae.roc_curve(c, d)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert torch.all(fpr[1:] >= fpr[:-1]) and torch.all(tpr[1:] >= tpr[:-1])
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(ae.roc_auc(c, d), abs=1e-9)


# -- training and the registered models --------------------------------------------------------
def test_train_autoencoder_lowers_the_loss_with_every_option():
    from course_utils.data import BatchLoader

    x = torch.rand(256, 1, 28, 28, generator=gen()).pow(4)
    loader = BatchLoader(x, torch.zeros(256, dtype=torch.long), batch_size=64)
    torch.manual_seed(0)
    model = ae.MLPAutoencoder(8, hidden=(32,))
    result = ae.train_autoencoder(model, loader, epochs=6, lr=3e-3, device="cpu", progress=False,
                                  live_plot=False, corrupt=ae.make_corruption("masking", 0.3),
                                  sparse_lam=1e-3, contractive_lam=1e-3, contractive_batch=16)
    assert set(result.history.logs) == {"reconstruction", "sparse", "contractive"}
    assert result.history.losses[-1] < result.history.losses[0]
    with pytest.raises(ValueError):
        ae.make_corruption("salt", 0.1)


@pytest.mark.parametrize("make", [ae.ae_config, ae.dae_config])
@pytest.mark.parametrize("budget_name", ["smoke", "classroom", "full"])
def test_configs_are_json_and_build(make, budget_name):
    config = make(budget_name)
    json.dumps(config)
    assert config["budget"] == budget_name and config["steps"] > 0
    model = ae.build_ae(config)
    assert sum(p.numel() for p in model.parameters()) > 0
    if config["model"] == "ConvAutoencoder":
        assert isinstance(model, ae.ConvAutoencoder) and config["latent_dim"] == 8


def test_evaluate_reports_ae_and_pca_errors(data_dir):
    config = ae.dae_config("smoke")
    model = ae.build_dae(config)
    info = ae.train_dae(model, config, "cpu")
    assert info["train_steps"] == config["steps"]
    metrics = ae.evaluate_ae(model, config, "cpu")
    for key in ("test_mse", "pca_mse", "ratio_ae_over_pca", "noisy_input_mse", "test_images"):
        assert key in metrics
    assert metrics["ratio_ae_over_pca"] == pytest.approx(metrics["test_mse"] / metrics["pca_mse"], rel=1e-2)
    assert "held out" in metrics["test_data"] or "test" in metrics["test_data"]


# -- sparse coding: soft thresholding, ISTA, the dictionary step ------------------------------
@pytest.fixture
def one_thread():
    """These problems are tiny: one thread is fastest, and spares a busy machine's other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_sparse_data(d=16, k=8, n=300, density=0.25, noise=0.01, seed=0, dtype=torch.float32):
    """x_n = D h_n + noise with a random unit-norm D (d, k) and sparse Gaussian codes h_n."""
    g = gen(seed)
    dictionary = torch.randn(d, k, generator=g, dtype=dtype)
    dictionary = dictionary / dictionary.norm(dim=0)
    codes = torch.randn(n, k, generator=g, dtype=dtype) * (torch.rand(n, k, generator=g) < density)
    x = codes @ dictionary.T + noise * torch.randn(n, d, generator=g, dtype=dtype)
    return x, dictionary, codes


def best_cosines(true, learned):
    """For every true atom, the largest |cosine| with a learned atom (sign and order free)."""
    true, learned = true / true.norm(dim=0), learned / learned.norm(dim=0)
    return (true.T @ learned).abs().max(dim=1).values


def test_soft_threshold_values_and_broadcast():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert torch.equal(ae.soft_threshold(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]))
    assert torch.equal(ae.soft_threshold(x, 0.0), x)
    t = torch.tensor([[0.5], [2.5]])                      # one threshold per row
    out = ae.soft_threshold(x.expand(2, -1), t)
    assert torch.equal(out[0], torch.tensor([-2.5, -0.5, 0.0, 0.0, 0.0, 0.5, 2.5]))
    assert torch.equal(out[1], torch.tensor([-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]))
    assert ae.soft_threshold(x.double(), 1.0).dtype == torch.float64


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_soft_threshold_is_the_prox_of_the_l1_norm(t):
    # S_t(x) = argmin_z 1/2 (z - x)^2 + t |z|, found by brute force on a fine grid
    x = torch.tensor([-2.0, -1.1, -0.7, -0.2, 0.0, 0.25, 0.9, 1.6], dtype=torch.float64)
    z = torch.linspace(-4, 4, 80001, dtype=torch.float64)
    energy = 0.5 * (z[None, :] - x[:, None]) ** 2 + t * z.abs()[None, :]
    assert torch.allclose(z[energy.argmin(dim=1)], ae.soft_threshold(x, t), atol=2e-4)


def test_lasso_objective_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    dictionary = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    codes = torch.tensor([[1.0, 0.0, 0.5], [0.0, -2.0, 0.0]])
    # reconstructions (1.5, 0.5) and (0, -2): squared errors 0.25 + 2.25 and 0 + 1
    expected = torch.tensor([0.5 * 2.5 + 0.1 * 1.5, 0.5 * 1.0 + 0.1 * 2.0])
    assert torch.allclose(ae.lasso_objective(x, dictionary, codes, 0.1), expected)


@pytest.mark.usefixtures("one_thread")
def test_ista_reaches_the_lasso_optimality_conditions():
    g = gen(1)
    dictionary = torch.randn(8, 12, generator=g, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    lam = 0.3
    h = ae.ista(x, dictionary, lam, steps=3000)
    assert h.shape == (5, 12) and h.dtype == torch.float64
    # KKT: D_j^T (x - D h) = lam sign(h_j) where h_j != 0, |D_j^T (x - D h)| <= lam where h_j = 0
    correlation = (x - h @ dictionary.T) @ dictionary
    active = h != 0
    assert 0 < active.sum() < h.numel()                   # sparse, but not all zero
    assert torch.allclose(correlation[active], lam * h[active].sign(), atol=1e-6)
    assert correlation[~active].abs().max() <= lam + 1e-6
    # warm start from the optimum stays there
    assert torch.allclose(ae.ista(x, dictionary, lam, steps=5, codes=h), h, atol=1e-8)


@pytest.mark.usefixtures("one_thread")
def test_fista_beats_ista_after_a_few_steps():
    g = gen(2)
    dictionary = torch.randn(10, 20, generator=g)
    x = torch.randn(32, 10, generator=g)
    lam = 0.2
    objective = {fista: ae.lasso_objective(x, dictionary, ae.ista(x, dictionary, lam, steps=20, fista=fista),
                                           lam).mean() for fista in (False, True)}
    assert objective[True] < objective[False]
    start = ae.lasso_objective(x, dictionary, torch.zeros(32, 20), lam).mean()
    assert objective[False] < start


@pytest.mark.usefixtures("one_thread")
def test_ista_with_an_orthonormal_dictionary_is_one_soft_threshold():
    # D^T D = I: the Lasso splits per coordinate and its solution is S_lam(D^T x)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen(3), dtype=torch.float64))
    dictionary = q[:, :6]
    x = torch.randn(7, 9, generator=gen(4), dtype=torch.float64)
    expected = ae.soft_threshold(x @ dictionary, 0.4)
    assert torch.allclose(ae.ista(x, dictionary, 0.4, steps=1, fista=False), expected, atol=1e-12)
    assert torch.allclose(ae.ista(x, dictionary, 0.4, steps=30), expected, atol=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_update_dictionary_recovers_a_planted_dictionary():
    x, true, codes = planted_sparse_data()
    learned = ae.update_dictionary(x, codes)
    assert learned.shape == true.shape and learned.dtype == x.dtype
    assert torch.allclose(learned.norm(dim=0), torch.ones(8), atol=1e-5)
    assert best_cosines(true, learned).min() > 0.99
    # the same up to a permutation and signs of the codes
    perm, signs = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4]), torch.tensor([1, -1, 1, 1, -1, 1, -1, 1.0])
    assert best_cosines(true, ae.update_dictionary(x, codes[:, perm] * signs)).min() > 0.99


@pytest.mark.usefixtures("one_thread")
def test_update_dictionary_reinitializes_unused_atoms_from_data():
    x, _, codes = planted_sparse_data(dtype=torch.float64)
    codes[:, 2] = 0                                       # atom 2 is used by nobody
    learned = ae.update_dictionary(x, codes, generator=gen(5))
    assert torch.allclose(learned.norm(dim=0), torch.ones(8, dtype=torch.float64))
    rows = x / x.norm(dim=1, keepdim=True)
    assert (rows @ learned[:, 2]).max() > 1 - 1e-12      # a normalized data row


@pytest.mark.usefixtures("one_thread")
def test_learn_dictionary_lowers_the_objective_and_finds_the_atoms():
    x, true, _ = planted_sparse_data()
    learned, history = ae.learn_dictionary(x, 8, 0.05, iterations=100, ista_steps=50, generator=gen(1))
    assert learned.shape == (16, 8) and len(history) == 100
    assert torch.allclose(learned.norm(dim=0), torch.ones(8), atol=1e-5)
    assert history[-1] < 0.75 * history[0]
    bump = 1e-3 * history[0]
    ups = sum(later > earlier + bump for earlier, later in zip(history, history[1:], strict=False))
    assert ups <= 5                                        # it goes down, up to rounding-size bumps
    assert best_cosines(true, learned).min() > 0.95


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_sparse_coding_keeps_dtype_and_device(device):
    x, _, _ = planted_sparse_data(d=6, k=4, n=40, dtype=torch.float64)
    x = x.to(device)
    learned, history = ae.learn_dictionary(x, 4, 0.05, iterations=3, ista_steps=10)
    assert learned.dtype == torch.float64 and learned.device.type == device and len(history) == 3
    codes = ae.ista(x, learned, 0.05, steps=10)
    assert codes.dtype == torch.float64 and codes.device.type == device
    assert ae.lasso_objective(x, learned, codes, 0.05).shape == (40,)

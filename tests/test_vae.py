"""Tests for course_utils.vae: the formulas against torch.distributions and Monte Carlo,
the bounds against a model whose marginal likelihood is known exactly, and a short real run."""

import math

import pytest
import torch
from torch import distributions as D
from torch import nn

from course_utils import vae as V


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- Gaussian KL ------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    g = gen()
    mu, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)),
                               D.Normal(torch.zeros(5), torch.ones(5))).sum(-1)
    got = V.gaussian_kl(mu, logvar)
    assert got.shape == (7,)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gaussian_kl_is_zero_only_at_the_prior_and_sums_over_the_last_dim():
    assert torch.allclose(V.gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))
    one = V.gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    assert one.item() == pytest.approx(0.5)  # mu^2 / 2
    mu, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert V.gaussian_kl(mu, logvar).shape == (2, 3)
    assert (V.gaussian_kl(mu, logvar) > 0).all()


def test_gaussian_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([0.7, -1.2, 0.0]), torch.tensor([-0.5, 0.3, -2.0])
    z = mu + torch.exp(0.5 * logvar) * torch.randn(400_000, 3)
    log_q = V.log_normal(z, mu, logvar)
    log_p = V.log_standard_normal(z)
    mc = (log_q - log_p).mean()
    stderr = (log_q - log_p).std() / math.sqrt(len(z))
    assert abs(mc - V.gaussian_kl(mu, logvar)) < 4 * stderr


def test_kl_between_two_gaussians():
    g = gen(1)
    mq, lq, mp, lp = (torch.randn(6, 3, generator=g) for _ in range(4))
    expected = D.kl_divergence(D.Normal(mq, torch.exp(0.5 * lq)),
                               D.Normal(mp, torch.exp(0.5 * lp))).sum(-1)
    assert torch.allclose(V.gaussian_kl_between(mq, lq, mp, lp), expected, atol=1e-5)
    assert torch.allclose(V.gaussian_kl_between(mq, lq, torch.zeros(3), torch.zeros(3)),
                          V.gaussian_kl(mq, lq), atol=1e-6)


# -- densities --------------------------------------------------------------------------
def test_log_densities_have_one_constant_per_dimension():
    g = gen(2)
    x, mean, logvar = (torch.randn(4, 10, generator=g) for _ in range(3))
    expected = D.Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    assert torch.allclose(V.log_normal(x, mean, logvar), expected, atol=1e-5)
    assert torch.allclose(V.log_standard_normal(x), D.Normal(0.0, 1.0).log_prob(x).sum(-1))
    # x == mean, unit variance: exactly -D/2 log(2 pi) (the seed adds -1/2 log(2 pi) only once)
    images = torch.rand(3, 1, 28, 28)
    value = V.gaussian_log_likelihood(images, images, 0.0)
    assert torch.allclose(value, torch.full((3,), -784 / 2 * math.log(2 * math.pi)))


def test_bernoulli_log_likelihood_matches_torch():
    g = gen(3)
    logits = 3 * torch.randn(5, 1, 28, 28, generator=g)
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3), generator=g)
    expected = D.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(V.bernoulli_log_likelihood(logits, x), expected, atol=1e-4)


# -- reparameterization -----------------------------------------------------------------
def test_reparameterize_has_the_right_statistics():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5]).expand(200_000, 3)
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.01)]).expand(200_000, 3)
    z = V.reparameterize(mu, logvar)
    assert z.shape == mu.shape
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0, 0.5]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([1.0, 2.0, 0.1]), rtol=0.02)


def test_reparameterize_passes_gradients_to_mu_and_logvar():
    torch.manual_seed(0)
    mu = torch.tensor([0.3, -0.4], requires_grad=True)
    logvar = torch.tensor([0.2, -1.0], requires_grad=True)
    n = 100_000
    z = V.reparameterize(mu.expand(n, 2), logvar.expand(n, 2))
    (z**2).sum(-1).mean().backward()  # E[z^2] = mu^2 + sigma^2
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.02)
    assert torch.allclose(logvar.grad, logvar.detach().exp(), atol=0.03)


# -- bounds on a model whose marginal is known ------------------------------------------
class LinearGaussian(nn.Module):
    """z ~ N(0, 1) (1-d), x | z ~ N(w z + b, s2 I): p(x) = N(b, w w^T + s2 I) exactly.

    The exact posterior is 1-d Gaussian; ``posterior_scale`` < 1 squeezes q's variance
    and ``shift`` moves its mean, to make q a poor approximation on purpose.
    """

    def __init__(self, dim=5, s2=0.3, shift=0.0, posterior_scale=1.0, seed=0):
        super().__init__()
        g = gen(seed)
        self.w, self.b, self.s2 = torch.randn(dim, generator=g), torch.randn(dim, generator=g), s2
        self.shift, self.scale = shift, posterior_scale
        self.latent_dim = 1

    def log_marginal(self, x):
        cov = torch.outer(self.w, self.w) + self.s2 * torch.eye(len(self.w))
        return D.MultivariateNormal(self.b, cov).log_prob(x)

    def encode(self, x):
        precision = 1 + (self.w @ self.w) / self.s2
        mean = ((x - self.b) @ self.w / self.s2) / precision
        logvar = torch.full_like(mean, -math.log(precision) + 2 * math.log(self.scale))
        return (mean + self.shift).unsqueeze(-1), logvar.unsqueeze(-1)

    def decode(self, z):
        return z * self.w + self.b

    def log_likelihood(self, x, mean):
        return V.gaussian_log_likelihood(x, mean, math.log(self.s2))


def toy_data(model, n=64, seed=1):
    g = gen(seed)
    z = torch.randn(n, 1, generator=g)
    return model.decode(z) + math.sqrt(model.s2) * torch.randn(n, len(model.w), generator=g)


def test_elbo_is_below_log_p_and_tight_at_the_exact_posterior():
    torch.manual_seed(0)
    exact = LinearGaussian()
    x = toy_data(exact)
    log_px = exact.log_marginal(x)
    # with q = the true posterior, log p(x,z) - log q(z|x) = log p(x) for every z: no gap, no noise
    log_w = V.importance_log_weights(exact, x, k=7)
    assert log_w.shape == (7, 64)
    assert torch.allclose(log_w, log_px.expand(7, 64), atol=1e-4)
    assert torch.allclose(V.iwae_nll(exact, x, k=7, reduction="none"), -log_px, atol=1e-4)
    # elbo() uses the closed-form KL and one sample of log p(x|z): right on average
    repeats = 2000
    many = x.repeat(repeats, 1)
    exact_elbo = V.elbo(exact, many).reshape(repeats, -1).mean(0)
    assert torch.allclose(exact_elbo, log_px, atol=0.1)
    poor = LinearGaussian(shift=0.5, posterior_scale=2.0)
    elbo = V.elbo(poor, many).reshape(repeats, -1).mean(0)
    assert (elbo < log_px).all()
    # the gap is KL(q || posterior), which is known in closed form here
    mu_q, lv_q = poor.encode(x)
    mu_p, lv_p = exact.encode(x)
    gap = V.gaussian_kl_between(mu_q, lv_q, mu_p, lv_p)
    assert torch.allclose(log_px - elbo, gap, atol=0.6)  # Monte-Carlo noise, per image
    assert abs((log_px - elbo).mean() - gap.mean()) < 0.06  # averaged over 64 images


def test_iwae_nll_decreases_with_k_towards_the_true_nll():
    torch.manual_seed(0)
    poor = LinearGaussian(shift=0.5, posterior_scale=2.0)  # q wider than the posterior
    x = toy_data(poor, n=256)
    true_nll = -poor.log_marginal(x).mean()
    nll = {k: V.iwae_nll(poor, x, k=k).item() for k in (1, 3, 10, 30, 1000)}
    assert nll[1] > nll[3] > nll[10] > nll[30] > true_nll - 0.02
    assert nll[1] - true_nll > 2  # the ELBO is loose ...
    assert abs(nll[1000] - true_nll) < 0.02  # ... the IWAE bound converges to the true NLL
    per_image = V.iwae_nll(poor, x, k=10, reduction="none")
    assert per_image.shape == (256,)


def test_iwae_bound_is_logmeanexp():
    lw = torch.log(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # k = 2 weights for 2 images
    assert torch.allclose(V.iwae_bound(lw), torch.log(torch.tensor([2.0, 4.0])))


# -- models ---------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_conv_vae_shapes(likelihood):
    model = V.VAE(latent_dim=8, channels=(8, 16), hidden=32, blocks=1, likelihood=likelihood)
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    logits = model.decode(mu)
    assert logits.shape == (3, 1, 28, 28)
    assert model.log_likelihood(x, logits).shape == (3,)
    assert V.elbo(model, x).shape == (3,)
    samples = model.sample(4)
    assert samples.shape == (4, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_plain_conv_vae_and_fixed_gaussian_variance():
    plain = V.VAE(latent_dim=16, channels=(32, 64), hidden=0)
    assert plain.decode(torch.zeros(2, 16)).shape == (2, 1, 28, 28)
    fixed = V.VAE(latent_dim=4, channels=(8, 8), hidden=0, likelihood="gaussian",
                  decoder_logvar=0.0)
    assert not any(p is fixed.decoder_logvar for p in fixed.parameters())
    x = torch.rand(2, 1, 28, 28)
    logits = fixed.decode(torch.zeros(2, 4))
    expected = D.Normal(torch.sigmoid(logits), 1.0).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(fixed.log_likelihood(x, logits), expected, atol=1e-3)


def test_conditional_vae_uses_the_label():
    torch.manual_seed(0)
    model = V.ConditionalVAE(latent_dim=6, channels=(8, 16), hidden=32)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    mu, logvar = model.encode(x, y)
    assert mu.shape == (4, 6)
    z = torch.zeros(4, 6)
    assert model.decode(z, y).shape == (4, 1, 28, 28)
    assert not torch.allclose(model.decode(z, y), model.decode(z, torch.tensor([9, 9, 9, 9])))
    assert model.sample(torch.arange(10)).shape == (10, 1, 28, 28)
    assert V.iwae_nll(model, x, k=3, y=y).shape == ()
    assert V.condition_on_label(torch.zeros(2, 5), torch.tensor([1, 3])).shape == (2, 15)


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_mlp_vae_is_a_module_with_the_right_constant(variance):
    model = V.MLPVAE(dim_z=4, dim_hidden=16, decoder_variance=variance)
    assert isinstance(model, nn.Module) and len(list(model.parameters())) == 8
    x = torch.rand(3, 1, 28, 28)
    out, mu, logvar = model(x)
    assert mu.shape == (3, 4)
    assert out.shape == (3, 784 * (2 if variance == "learned" else 1))
    mean, lv = model._mean_logvar(out)
    expected = D.Normal(mean, torch.exp(0.5 * lv)).log_prob(x.reshape(3, -1)).sum(-1)
    assert torch.allclose(model.log_likelihood(x, out), expected, atol=1e-3)
    assert model.mean_image(out).shape == (3, 1, 28, 28)
    loss, logs = V.vae_loss(model, (x, torch.zeros(3)))
    loss.backward()
    assert set(logs) == {"reconstruction", "kl"}


def test_mlp_vae_bernoulli_and_bad_arguments():
    model = V.MLPVAE(dim_z=2, dim_hidden=8, likelihood="bernoulli")
    x = torch.bernoulli(torch.rand(2, 784))
    assert model.log_likelihood(x, model.decode(torch.zeros(2, 2))).shape == (2,)
    with pytest.raises(ValueError, match="likelihood"):
        V.MLPVAE(likelihood="poisson")
    with pytest.raises(ValueError, match="decoder_variance"):
        V.MLPVAE(decoder_variance="sometimes")


def test_schedules():
    assert V.lr_factor(0.0) < 0.1 and V.lr_factor(0.02) == pytest.approx(1.0)
    assert V.lr_factor(1.0) == pytest.approx(0.02)
    assert V.kl_weight(0.05, 0.1) == pytest.approx(0.5) and V.kl_weight(0.5, 0.1) == 1.0
    assert V.kl_weight(0.0, 0.0) == 1.0


# -- the registry functions and a short real run -----------------------------------------
@pytest.mark.parametrize("budget_name", ["smoke", "classroom", "full"])
def test_config_builds_a_model(budget_name):
    config = V.vae_config(budget_name)
    assert config["budget"] == budget_name and config["eval_k"] >= (100 if budget_name != "smoke" else 1)
    model = V.build_vae(config)
    assert isinstance(model, V.VAE) and model.latent_dim == config["latent_dim"]


def test_a_short_real_training_run_lowers_the_negative_elbo(data_dir):
    from course_utils.data import as_tensors, mnist

    torch.manual_seed(0)
    config = dict(V.vae_config("smoke"), epochs=1, seed=0)
    train = mnist("train", binarize=True)
    images, labels = as_tensors(train, limit=2048)
    test_images, _ = as_tensors(mnist("test", binarize="fixed", binarize_seed=0), limit=256)
    model = V.build_vae(config)

    def held_out():
        torch.manual_seed(1)
        return V.evaluate_bounds(model, test_images, k=5)["neg_elbo"]

    before = held_out()
    info = V.train_vae(model, config, "cpu", max_seconds=60, images=images, labels=labels,
                       progress=False, live_plot=False)
    after = held_out()
    assert info["train_steps"] == 16 and len(model.history.losses) == 16
    assert after < before - 50, (before, after)


def test_evaluate_vae_reports_nats_and_k(data_dir, monkeypatch):
    torch.manual_seed(0)
    config = dict(V.vae_config("smoke"), eval_images=50, eval_k=4, prior_samples=20, seed=0)
    model = V.build_vae(config)
    from course_utils import metrics

    # a stand-in classifier keeps the test fast
    monkeypatch.setattr(metrics, "load_feature_net", lambda device=None: nn.Sequential(
        nn.Flatten(), nn.Linear(784, 10)))
    result = V.evaluate_vae(model, config, "cpu")
    assert result["iwae_k"] == 4 and result["test_images"] == 50
    assert 400 < result["test_iwae_nll"] <= result["test_neg_elbo"] + 1e-3
    assert "fixed binarization" in result["test_data"]
    assert 0 <= result["prior_confident_fraction"] <= 1 and result["prior_samples"] == 20


def test_progress_reads_the_clock_only_when_a_step_is_done(monkeypatch):
    from course_utils import vae as vae_module

    clock = [100.0]
    monkeypatch.setattr(vae_module.time, "monotonic", lambda: clock[0])
    progress = vae_module.Progress(10, max_seconds=20)
    clock[0] += 5          # setting up the first batch: no step done, so no progress yet
    assert progress() == 0
    progress.step = 1      # 1 of 10 steps after 5 of 20 s: the clock is ahead
    assert progress() == 0.25
    progress.step = 6      # 6 of 10 steps, still 5 s: the steps are ahead
    assert progress() == 0.6
    clock[0] += 100        # past the limit, but the fraction waits for the next step
    assert progress() == 0.6
    progress.step = 7
    assert progress() == 1.0
    assert vae_module.Progress(10, max_seconds=None)() == 0

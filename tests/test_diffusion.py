"""Topic 6 library: schedules, the forward process and its posterior, parameterizations, losses,
the U-Net, and samplers driven by exact noise predictors (a point mass, a Gaussian mixture)."""

import math

import pytest
import torch

from course_utils import diffusion as dm


@pytest.fixture(scope="module")
def short_schedule():
    return dm.NoiseSchedule(200, "cosine")


def test_linear_schedule_is_ddpms_and_the_products_are_cumulative():
    s = dm.NoiseSchedule(1000, "linear")
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert torch.allclose(s.alpha_bars[5], s.alphas[:6].prod())
    assert float(s.alpha_bars_prev[0]) == 1.0 and torch.equal(s.alpha_bars_prev[1:], s.alpha_bars[:-1])
    assert float(s.alpha_bars[-1]) < 1e-4                      # the signal is gone at T
    short = dm.NoiseSchedule(100, "linear")                     # rescaled: as destructive in 100 steps
    assert float(short.alpha_bars[-1]) < 1e-3


def test_cosine_schedule_follows_its_formula_and_its_snr_falls():
    s = dm.NoiseSchedule(1000, "cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):                              # tensor index t is the paper's t + 1
        assert float(s.alpha_bars[t]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-6)
    log_snr = s.log_snr()
    assert bool((log_snr[1:] < log_snr[:-1]).all())
    linear = dm.NoiseSchedule(1000, "linear")
    # the linear schedule spends its last steps on pure noise: far lower SNR at 3/4 of the way
    assert float(linear.log_snr()[750]) < float(log_snr[750]) - 2
    with pytest.raises(ValueError):
        dm.NoiseSchedule(10, "quadratic")


def test_q_sample_has_the_closed_form_moments(short_schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3]).repeat(200_000, 1)
    for t in (0, 50, 199):
        xt = dm.q_sample(x0, t, torch.randn(x0.shape, generator=g), short_schedule)
        a = float(short_schedule.alpha_bars[t])
        assert torch.allclose(xt.mean(0), math.sqrt(a) * x0[0], atol=0.01)
        assert torch.allclose(xt.var(0), torch.full((2,), 1 - a), rtol=0.02, atol=1e-4)


def test_many_small_steps_equal_the_one_jump():
    s = dm.NoiseSchedule(30, "linear")
    g = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), 1.5)
    for t in range(30):                                        # q(x_t | x_{t-1}) step by step
        x = s.alphas[t].sqrt().float() * x + s.betas[t].sqrt().float() * torch.randn(x.shape, generator=g)
    a = float(s.alpha_bars[-1])
    assert float(x.mean()) == pytest.approx(math.sqrt(a) * 1.5, abs=0.01)
    assert float(x.var()) == pytest.approx(1 - a, rel=0.02)


def test_posterior_is_the_normalised_product_of_two_gaussians(short_schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), integrated on a grid."""
    s = short_schedule
    x0, xt = torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[-0.2]], dtype=torch.float64)
    for t in (1, 30, 150):
        grid = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
        forward_factor = -(xt[0, 0] - s.alphas[t].sqrt() * grid) ** 2 / (2 * s.betas[t])
        prior_factor = -(grid - s.alpha_bars[t - 1].sqrt() * x0[0, 0]) ** 2 / (2 * (1 - s.alpha_bars[t - 1]))
        log_density = forward_factor + prior_factor
        w = torch.softmax(log_density, 0)
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        mu, v = dm.posterior_mean_variance(x0, xt, torch.tensor([t]), s)
        assert float(mu) == pytest.approx(float(mean), abs=1e-6)
        assert float(v) == pytest.approx(float(var), rel=1e-4)
    mu, v = dm.posterior_mean_variance(x0, xt, torch.tensor([0]), s)     # the first step: x0 itself
    assert float(mu) == pytest.approx(0.4) and float(v) == 0.0


def test_parameterizations_convert_into_each_other(short_schedule):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 200, (8,), generator=g)
    s = short_schedule.to(dtype=torch.float32)
    xt = dm.q_sample(x0, t, eps, s)
    assert torch.allclose(dm.predict_x0(xt, t, eps, s), x0, atol=1e-3)
    assert torch.allclose(dm.predict_eps(xt, t, x0, s), eps, atol=1e-3)
    x0_back, eps_back = dm.x0_eps_from_velocity(xt, t, dm.velocity(x0, t, eps, s), s)
    assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, eps, atol=1e-4)
    # the seed's mean in terms of eps equals the posterior mean around the implied x0
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=g)
    mean, _ = dm.posterior_mean_variance(dm.predict_x0(xt, t, eps_hat, s), xt, t, s)
    assert torch.allclose(dm.model_mean(xt, t, eps_hat, s), mean, atol=1e-4)


def test_vlb_weights_turn_the_kl_into_a_weighted_noise_error(short_schedule):
    s = short_schedule
    g = torch.Generator().manual_seed(3)
    x0, eps, eps_hat = (torch.randn(1, 5, generator=g, dtype=torch.float64) for _ in range(3))
    weights = dm.vlb_weights(s, variance="beta")
    for t in (3, 100):
        tt = torch.tensor([t])
        xt = dm.q_sample(x0, tt, eps, s)
        true_mean, _ = dm.posterior_mean_variance(x0, xt, tt, s)
        kl = (true_mean - dm.model_mean(xt, tt, eps_hat, s)).pow(2).sum() / (2 * s.betas[t])
        assert float(kl) == pytest.approx(float(weights[t] * (eps - eps_hat).pow(2).sum()), rel=1e-8)
    assert bool((dm.vlb_weights(s) > 0).all())


class _Recorder(torch.nn.Module):
    num_classes = 10

    def forward(self, x, t, y=None):
        self.labels = y
        return torch.zeros_like(x)


def test_ddpm_loss_scores_predictors_and_drops_labels():
    s = dm.NoiseSchedule(100, "cosine").to(dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x0 = torch.full((4096, 1, 2, 2), 0.5)
    assert float(dm.ddpm_loss(_Recorder(), x0, s, generator=g)) == pytest.approx(1.0, abs=0.03)
    exact = dm.GaussianMixtureDenoiser([[0.5] * 4], schedule=s)
    exact_loss = dm.ddpm_loss(lambda x, t: exact(x.reshape(len(x), -1), t).reshape(x.shape), x0, s,
                              generator=g)
    assert float(exact_loss) < 1e-6
    recorder, y = _Recorder(), torch.arange(4096) % 10
    dm.ddpm_loss(recorder, x0, s, y, label_dropout=0.25, generator=g)
    dropped = recorder.labels == 10
    assert 0.2 < float(dropped.float().mean()) < 0.3
    assert torch.equal(recorder.labels[~dropped], y[~dropped])
    dm.ddpm_loss(recorder, x0, s, y, generator=g)
    assert torch.equal(recorder.labels, y)
    # the bound's weights, normalised to mean 1, multiply each image's error at its own t
    weighted = dm.ddpm_loss(_Recorder(), x0, s, weighting="vlb", generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (4096,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    weights = dm.vlb_weights(s).float()
    expected = (noise.pow(2).flatten(1).mean(1) * (weights / weights.mean())[t]).mean()
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert float(weights[1]) > 10 * float(weights[50])     # the bound stresses the low-noise steps


def test_timestep_embedding_is_sinusoidal():
    e = dm.timestep_embedding(torch.tensor([0, 10]), 16)
    assert e.shape == (2, 16)
    assert torch.allclose(e[0, :8], torch.ones(8)) and torch.allclose(e[0, 8:], torch.zeros(8))
    assert float(e[1, 0]) == pytest.approx(math.cos(10.0)) and float(e[1, 8]) == pytest.approx(math.sin(10.0))


def test_unet_shapes_start_at_zero_and_hear_time_and_class():
    torch.manual_seed(0)
    net = dm.UNet(1, (8, 16, 16), 1, num_classes=10)
    x = torch.randn(3, 1, 28, 28)
    assert torch.count_nonzero(net(x, torch.tensor([1, 2, 3]))) == 0   # zero-initialised output
    torch.nn.init.normal_(net.out.weight, std=0.1)
    for block in [*net.down_blocks, *net.middle, *net.up_blocks]:
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
    base = net(x, torch.tensor([5, 5, 5]), torch.tensor([1, 1, 1]))
    assert base.shape == x.shape
    assert not torch.allclose(base, net(x, torch.tensor([500, 500, 500]), torch.tensor([1, 1, 1])))
    assert not torch.allclose(base, net(x, torch.tensor([5, 5, 5]), torch.tensor([7, 7, 7])))
    null = net(x, torch.tensor([5, 5, 5]), torch.tensor([10, 10, 10]))
    assert torch.allclose(null, net(x, torch.tensor([5, 5, 5])))      # y=None is the null label


def _mixture(schedule):
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    return dm.GaussianMixtureDenoiser(means, stds=torch.tensor([0.3, 0.5, 0.2]),
                                      weights=torch.tensor([0.5, 0.3, 0.2]), schedule=schedule)


def _component_stats(samples, oracle):
    nearest = torch.cdist(samples.double(), oracle.means).argmin(1)
    shares = torch.bincount(nearest, minlength=3).double() / len(samples)
    stds = torch.stack([samples[nearest == k].double().std(0).mean() if (nearest == k).sum() > 1
                        else torch.tensor(float("nan"), dtype=torch.float64) for k in range(3)])
    return shares, stds


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm-beta", "ddim-eta0", "ddim-eta1"])
def test_samplers_driven_by_the_exact_noise_recover_a_gaussian_mixture(sampler, short_schedule):
    s = short_schedule.to(dtype=torch.float32)
    oracle = _mixture(short_schedule)
    g = torch.Generator().manual_seed(5)
    if sampler.startswith("ddpm"):
        variance = "beta" if sampler.endswith("beta") else "posterior"
        x = dm.ddpm_sample(oracle, s, (6000, 2), generator=g, variance=variance)
    else:
        x = dm.ddim_sample(oracle, s, (6000, 2), 50, eta=float(sampler[-1]), generator=g)
    shares, stds = _component_stats(x, oracle)
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03)
    assert torch.allclose(stds, torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64), rtol=0.15)


def test_samplers_collapse_onto_a_point_mass(short_schedule):
    s = short_schedule.to(dtype=torch.float32)
    point = torch.tensor([[0.25, -0.75, 0.5]])
    oracle = dm.GaussianMixtureDenoiser(point, schedule=short_schedule)
    g = torch.Generator().manual_seed(6)
    for x in (dm.ddpm_sample(oracle, s, (500, 3), generator=g),
              dm.ddim_sample(oracle, s, (500, 3), 10, generator=g)):
        assert torch.allclose(x, point.expand(500, 3), atol=1e-3)


def test_ddim_with_eta_one_on_every_step_is_ddpm(short_schedule):
    s = short_schedule.to(dtype=torch.float64)
    oracle = _mixture(short_schedule)
    ddpm = dm.ddpm_sample(oracle, s, (50, 2), generator=torch.Generator().manual_seed(7))
    ddim = dm.ddim_sample(oracle, s, (50, 2), 200, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ddpm.double(), ddim.double(), atol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_inverts(short_schedule):
    s = short_schedule.to(dtype=torch.float64)
    oracle = _mixture(short_schedule)
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a = dm.ddim_sample(oracle, s, x_T.shape, 100, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = dm.ddim_sample(oracle, s, x_T.shape, 100, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    recovered = dm.ddim_invert(oracle, s, a, 100)
    assert float((recovered - x_T).abs().median()) < 0.05
    again = dm.ddim_sample(oracle, s, x_T.shape, 100, x_T=recovered)
    assert float((again - a).abs().median()) < 0.02


def test_trajectory_lists_every_step(short_schedule):
    s = short_schedule.to(dtype=torch.float32)
    oracle = _mixture(short_schedule)
    x, trajectory = dm.ddim_sample(oracle, s, (4, 2), 20, return_trajectory=True)
    assert [t for t, _, _ in trajectory] == dm.ddim_timesteps(200, 20).tolist()
    assert torch.allclose(trajectory[-1][2], x, atol=1e-5)       # the last prediction is the sample


def test_cfg_combination_interpolates_and_extrapolates():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(dm.cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.equal(dm.cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(dm.cfg_combine(cond, uncond, 3.0), torch.tensor([3.0, 4.0]))


def test_guidance_with_exact_models_samples_the_requested_component(short_schedule):
    s = short_schedule.to(dtype=torch.float32)
    oracle = _mixture(short_schedule)
    y = torch.full((2000,), 2)
    g = torch.Generator().manual_seed(9)
    cfg = dm.ddim_sample(dm.conditional(oracle, y, 1.0), s, (2000, 2), 50, generator=g)
    shares, _ = _component_stats(cfg, oracle)
    assert float(shares[2]) > 0.99
    # classifier guidance with the exact p(k | x_t) and scale 1 is the exact conditional model
    exact = dm.classifier_guided(oracle, lambda x, t: oracle.component_logits(x, t), y, s, scale=1.0)
    x = torch.randn(2000, 2, generator=g)
    t = torch.full((2000,), 120)
    assert torch.allclose(exact(x, t), oracle(x, t, y), atol=1e-4)
    guided = dm.ddim_sample(exact, s, (2000, 2), 50, generator=g)
    assert float(_component_stats(guided, oracle)[0][2]) > 0.99


def test_conditional_batches_both_predictions_for_guidance():
    class Linear(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y=None):
            y = torch.full((len(x),), 3) if y is None else y
            return x * (1 + y.float()[:, None])

    model, x, t, y = Linear(), torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 0])
    guided = dm.conditional(model, y, 2.0)(x, t)
    assert torch.allclose(guided, dm.cfg_combine(model(x, t, y), model(x, t), 2.0))
    assert torch.allclose(dm.conditional(model, None)(x, t), model(x, t))


def test_noisy_classifier_learns_noised_digits_only_at_low_noise():
    s = dm.NoiseSchedule(100, "cosine").to(dtype=torch.float32)
    torch.manual_seed(0)
    classifier = dm.NoisyClassifier((8, 16), num_classes=2)
    x0 = torch.zeros(256, 1, 28, 28)
    y = torch.arange(256) % 2
    x0[y == 1, :, :, 14:] = 1.0                                 # class 1: right half bright
    x0 = dm.to_model_range(x0)
    opt = torch.optim.Adam(classifier.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = dm.noisy_classifier_loss(classifier, x0, y, s, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        low = dm.q_sample(x0, 5, torch.randn(x0.shape, generator=g), s)
        high = dm.q_sample(x0, 99, torch.randn(x0.shape, generator=g), s)
        accuracy_low = float((classifier(low, torch.full((256,), 5)).argmax(1) == y).float().mean())
        accuracy_high = float((classifier(high, torch.full((256,), 99)).argmax(1) == y).float().mean())
    assert accuracy_low > 0.95 and accuracy_high < 0.8


def test_mlp_denoiser_and_latent_diffusion_round_trip():
    from course_utils.vae import VAE

    torch.manual_seed(0)
    vae = VAE(latent_dim=4, channels=(8, 8), hidden=16)
    latent = dm.LatentDiffusion(vae, dm.Diffusion(dm.MLPDenoiser(4, 32, 2, num_classes=10),
                                                  dm.NoiseSchedule(50, "cosine")))
    images = torch.rand(6, 1, 28, 28)
    codes = latent.encode(images)
    assert codes.shape == (6, 4)
    latent.latent_mean.fill_(0.5)
    latent.latent_std.fill_(2.0)
    assert torch.allclose(latent.encode(images) * 2 + 0.5, codes, atol=1e-5)
    samples = latent.sample(torch.tensor([1, 2, 3]), steps=5, guidance_scale=2.0)
    assert samples.shape == (3, 1, 28, 28) and 0 <= float(samples.min()) and float(samples.max()) <= 1


def test_registered_models_train_and_report_in_smoke(tmp_path, monkeypatch, data_dir):
    from course_utils import registry

    monkeypatch.setenv("COURSE_CHECKPOINT_DIR", str(tmp_path))
    for name in dm.VARIANTS:
        spec = registry.get(name)
        config = registry.training_config(name, "smoke")
        config["steps"], config["eval_samples"] = 30, 100
        model = spec.build(config)
        facts = spec.train(model, config, device="cpu", progress=False)
        losses = model.history["loss"]
        assert facts["train_steps"] == 30 and sum(losses[-5:]) < sum(losses[:5])
        metrics = spec.evaluate(model, config, device="cpu")
        for key in ("fid", "kid", "precision", "recall", "classifier_score", "confident_fraction",
                    "floor_fid", "guided_fid", "class_agreement", "sample_seconds_64"):
            assert math.isfinite(metrics[key]), key
        assert metrics["floor_fid"] < metrics["fid"]
        samples = model.sample(torch.tensor([3, 4]), steps=4)
        assert samples.shape == (2, 1, 28, 28)
        if name == "ddpm":  # the benchmark's figures with the digit drawn first and mild guidance
            mild = dm.label_first_figures(model, config, 1.5, device="cpu")
            assert mild["n_samples"] == 100 and mild["guidance_scale"] == 1.5
            assert math.isfinite(mild["fid"]) and 0 <= mild["class_agreement"] <= 1


def _four_point_masses(schedule):
    means = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # binary 2-pixel "images"
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    return means, weights, dm.GaussianMixtureDenoiser(means, 0.0, weights, schedule)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_nll_bound_of_the_exact_denoiser_is_tight_and_above_the_true_nll(kind):
    schedule = dm.NoiseSchedule(1000, kind)
    means, weights, exact = _four_point_masses(schedule)
    generator = torch.Generator().manual_seed(0)
    x0 = exact.sample_data(300, generator=generator)
    component = ((x0[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    true_nll = -weights.log()[component]                       # -log p(x0), exactly, per example
    bound = dm.nll_bound(exact, x0, schedule, levels=2, generator=generator)
    gap = float((bound["total"] - true_nll).mean())
    assert 0 < gap < 0.05, gap                                 # a bound, and a tight one
    assert float(bound["prior"].max()) < 1e-3 and float(bound["decoder"].max()) < 1e-3
    # a model that believes the four points equally likely pays the cross-entropy log 4 instead
    uniform = dm.GaussianMixtureDenoiser(means, 0.0, None, schedule)
    wrong = dm.nll_bound(uniform, x0, schedule, levels=2, generator=generator)["total"].mean()
    assert abs(float(wrong) - math.log(4)) < 0.05 and float(wrong) > float(true_nll.mean()) + 0.08
    # sampling 20 of the 999 KL terms per example estimates the same sum
    estimates = torch.stack([dm.nll_bound(exact, x0, schedule, t_samples=20, generator=generator)["total"]
                             .mean() for _ in range(10)])
    assert abs(float(estimates.mean() - bound["total"].mean())) < 0.1


def test_discretised_decoder_bins_hold_all_the_mass():
    for levels in (2, 16, 256):
        values = torch.linspace(-1, 1, levels)
        for mean, std in ((0.3, 0.01), (-0.99, 0.2), (1.7, 0.05)):
            log_p = dm._discretised_gaussian_log_prob(values, torch.full_like(values, mean),
                                                      torch.full_like(values, std), levels)
            assert abs(float(log_p.double().exp().sum()) - 1) < 1e-5, (levels, mean, std)

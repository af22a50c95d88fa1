"""Tests for course_utils.gan: the game's closed forms on histograms, the losses against
hand-written formulas, the gradient penalty against critics whose gradients are known,
mode counting on constructed samples, and short real training runs."""

import math

import pytest
import torch
from torch import nn

from course_utils import gan as G


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- 1. the game on histograms --------------------------------------------------------
def test_optimal_discriminator_on_histograms():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.3, 0.0, 0.0])
    d = G.optimal_discriminator(p, q)
    assert torch.allclose(d, torch.tensor([0.5 / 0.6, 0.5, 1.0, 0.5], dtype=d.dtype))
    # when the model matches the data, D* is 1/2 everywhere
    assert torch.allclose(G.optimal_discriminator(p + 0.1, p + 0.1), torch.full((4,), 0.5))


def test_optimal_discriminator_maximises_the_value():
    g = gen(1)
    p, q = torch.rand(6, generator=g).double(), torch.rand(6, generator=g).double()
    p, q = p / p.sum(), q / q.sum()
    best = G.gan_value(p, q, G.optimal_discriminator(p, q))
    for _ in range(20):
        other = torch.rand(6, generator=g).double().clamp(0.01, 0.99)
        assert G.gan_value(p, q, other) < best


def test_js_divergence_bounds_and_disjoint_supports():
    p = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert G.js_divergence(p, 2 * p).item() == pytest.approx(0.0, abs=1e-12)  # normalised inside
    disjoint = G.js_divergence(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-12)
    # a hand-computed case: p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4)
    expected = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    hand = G.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert hand.item() == pytest.approx(expected, abs=1e-12)
    g = gen(2)
    for _ in range(10):
        a, b = torch.rand(5, generator=g), torch.rand(5, generator=g)
        value = G.js_divergence(a, b).item()
        assert 0 < value < math.log(2)
        assert value == pytest.approx(G.js_divergence(b, a).item())


def test_disjoint_supports_give_log_2_wherever_the_model_sits():
    data = torch.zeros(20)
    data[2] = 1
    values = []
    for shift in (5, 10, 15):
        model = torch.zeros(20)
        model[2 + shift] = 1
        values.append(G.js_divergence(data, model).item())
    assert values == pytest.approx([math.log(2)] * 3)  # no signal about how far away it is


def test_value_at_the_optimal_discriminator_is_minus_log4_plus_2js():
    g = gen(3)
    for _ in range(5):
        p, q = torch.rand(8, generator=g).double(), torch.rand(8, generator=g).double()
        q[0] = 0  # zeros are allowed (0 log 0 = 0)
        p, q = p / p.sum(), q / q.sum()  # D* compares densities, so both must be normalised
        value = G.gan_value(p, q, G.optimal_discriminator(p, q))
        assert value.item() == pytest.approx(-math.log(4) + 2 * G.js_divergence(p, q).item(), abs=1e-10)
    p = torch.rand(8, generator=g)
    p = p / p.sum()
    assert G.gan_value(p, p, G.optimal_discriminator(p, p)).item() == pytest.approx(-math.log(4), abs=1e-6)


# -- 2. losses on logits --------------------------------------------------------------
REAL = torch.tensor([2.0, -0.5, 0.3])
FAKE = torch.tensor([-1.0, 0.8, -3.0])


def sig(x):
    return 1 / (1 + torch.exp(-x))


def test_discriminator_losses_match_hand_formulas():
    standard = -(torch.log(sig(REAL)).mean() + torch.log(1 - sig(FAKE)).mean())
    smoothed = -((0.9 * torch.log(sig(REAL)) + 0.1 * torch.log(1 - sig(REAL))).mean()
                 + torch.log(1 - sig(FAKE)).mean())
    cases = {
        ("standard", 1.0): standard,
        ("standard", 0.9): smoothed,
        ("lsgan", 1.0): 0.5 * ((REAL - 1) ** 2).mean() + 0.5 * (FAKE**2).mean(),
        ("hinge", 1.0): torch.clamp(1 - REAL, min=0).mean() + torch.clamp(1 + FAKE, min=0).mean(),
        ("wgan", 1.0): FAKE.mean() - REAL.mean(),
    }
    for (kind, label), expected in cases.items():
        got = G.discriminator_loss(REAL, FAKE, kind=kind, real_label=label)
        assert got.item() == pytest.approx(expected.item(), abs=1e-6), kind
    # [N, 1] logits are accepted too
    column = G.discriminator_loss(REAL[:, None], FAKE[:, None])
    assert column.item() == pytest.approx(standard.item(), abs=1e-6)
    with pytest.raises(ValueError):
        G.discriminator_loss(REAL, FAKE, kind="hinge", real_label=0.9)
    with pytest.raises(ValueError):
        G.discriminator_loss(REAL, FAKE, kind="nope")


def test_generator_losses_match_hand_formulas():
    cases = {
        "saturating": torch.log(1 - sig(FAKE)).mean(),
        "non_saturating": -torch.log(sig(FAKE)).mean(),
        "lsgan": 0.5 * ((FAKE - 1) ** 2).mean(),
        "hinge": -FAKE.mean(),
        "wgan": -FAKE.mean(),
    }
    for kind, expected in cases.items():
        assert G.generator_loss(FAKE, kind=kind).item() == pytest.approx(expected.item(), abs=1e-6), kind
    assert set(cases) == set(G.GENERATOR_KINDS)
    assert {"saturating", "non_saturating", "lsgan", "hinge", "wgan", "wgan-gp"} <= set(G.LOSS_TABLE)


def test_saturating_loss_gradient_vanishes_when_d_rejects_the_fakes():
    for logit, sat_max, ns_min in ((-5.0, 0.01, 0.99), (-10.0, 1e-4, 0.9999)):
        x = torch.tensor([logit], requires_grad=True)
        (sat,) = torch.autograd.grad(G.generator_loss(x, "saturating"), x)
        (ns,) = torch.autograd.grad(G.generator_loss(x, "non_saturating"), x)
        # d/dl of log(1 - sigma(l)) is -sigma(l) -> 0; of -log sigma(l) is -(1 - sigma(l)) -> -1
        assert abs(sat.item()) < sat_max and abs(ns.item()) > ns_min
        assert sat.item() < 0 and ns.item() < 0  # both push the logit up: same direction, same fixed point


def test_the_non_saturating_loss_has_a_larger_gradient_early_in_toy_training():
    sat = G.train_toy_gan("ring", kind="saturating", steps=40, batch_size=128, seed=0)
    ns = G.train_toy_gan("ring", kind="non_saturating", steps=40, batch_size=128, seed=0)
    early = slice(10, 40)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(ns.history["g_grad_norm"][early]) > 1.5 * mean(sat.history["g_grad_norm"][early])


# -- gradient penalty and clipping ----------------------------------------------------
class Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x.reshape(len(x), -1) @ self.weight.reshape(-1)


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    g = gen(4)
    w = torch.randn(1 * 4 * 4, generator=g)
    critic = Linear(w / w.norm())
    real, fake = torch.rand(6, 1, 4, 4, generator=g), torch.rand(6, 1, 4, 4, generator=g)
    assert G.gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-6)
    # a weight of norm 3 gives (3 - 1)^2 = 4 for every sample
    critic3 = Linear(3 * w / w.norm())
    penalty = G.gradient_penalty(critic3, real, fake)
    assert penalty.item() == pytest.approx(4.0, rel=1e-5)
    penalty.backward()  # create_graph=True: the penalty reaches the critic's weights
    assert critic3.weight.grad is not None and critic3.weight.grad.abs().sum() > 0


def test_gradient_penalty_is_per_sample_with_per_sample_weights():
    class HalfSquare(nn.Module):  # C(x) = ½‖x‖², so ∇C(x̂) = x̂ and the norm is ‖x̂_i‖
        def forward(self, x):
            return 0.5 * x.pow(2).flatten(1).sum(1)

    g = gen(5)
    real, fake = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    penalty = G.gradient_penalty(HalfSquare(), real, fake, generator=gen(7))
    x_hat, eps = G.random_interpolates(real, fake, generator=gen(7))
    assert eps.shape == (8, 1, 1, 1) and len(set(eps.flatten().tolist())) == 8  # one weight per sample
    per_sample = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    per_pixel = ((x_hat.abs() - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(per_sample.item(), rel=1e-5)
    assert abs(penalty.item() - per_pixel.item()) > 0.1
    # extra critic arguments are passed through
    labelled = lambda x, labels: Linear(torch.ones(9) / 3)(x) + labels.float()  # noqa: E731
    value = G.gradient_penalty(labelled, real, fake, labels=torch.arange(8))
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_clip_weights():
    layer = nn.Linear(5, 3)
    with torch.no_grad():
        layer.weight.mul_(100)
    G.clip_weights(layer, 0.05)
    assert all(p.abs().max() <= 0.05 for p in layer.parameters())


# -- 3. the 2-D toy -------------------------------------------------------------------
def test_toy_data_sit_on_their_modes():
    ring = G.ring_of_gaussians(4000, modes=8, radius=2.0, std=0.02, generator=gen())
    centers = G.mode_centers("ring", modes=8, radius=2.0)
    assert ring.shape == (4000, 2) and centers.shape == (8, 2)
    assert torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0))
    counts = G.count_modes(ring, centers, std=0.02)
    assert counts["covered"] == 8 and counts["high_quality"] > 0.98
    assert counts["counts"].sum() > 3900 and counts["counts"].min() > 400
    grid = G.grid_of_gaussians(5000, side=5, spacing=2.0, std=0.02, generator=gen())
    grid_centers = G.mode_centers("grid", side=5, spacing=2.0)
    assert grid_centers.shape == (25, 2) and grid_centers.abs().max() == 4.0
    assert G.count_modes(grid, grid_centers, std=0.02)["covered"] == 25
    assert torch.equal(ring, G.ring_of_gaussians(4000, generator=gen()))  # repeatable


def test_count_modes_on_constructed_samples():
    centers = G.mode_centers("ring", modes=4, radius=1.0)  # (1,0), (0,1), (-1,0), (0,-1)
    samples = torch.cat([
        centers[0].expand(50, 2),                    # 50 exactly on mode 0
        centers[1].expand(3, 2) + 0.05,              # 3 near mode 1 (within 3 * 0.1 = 0.3)
        centers[2].expand(40, 2) + 0.5,              # 40 off mode 2: not high quality
        torch.zeros(7, 2),                           # 7 in the middle, far from everything
    ])
    result = G.count_modes(samples, centers, std=0.1, threshold=3.0, min_share=0.1)
    assert result["counts"].tolist() == [50, 3, 0, 0]
    assert result["high_quality"] == pytest.approx(53 / 100)
    # fair share n/K = 25, so a covered mode needs >= 2.5 samples: modes 0 and 1
    assert result["covered"] == 2
    assert G.count_modes(samples, centers, std=0.1, min_share=0.2)["covered"] == 1  # 3 < 5


def test_minibatch_std_layer():
    layer = G.MinibatchStdDev()
    same = torch.ones(6, 4)
    out = layer(same)
    assert out.shape == (6, 5) and out[:, -1].max() < 1e-3  # identical samples: no spread
    images = torch.randn(4, 3, 5, 5, generator=gen())
    out = layer(images)
    assert out.shape == (4, 4, 5, 5)
    expected = images.std(0, unbiased=False).mean()
    assert torch.allclose(out[:, 3], torch.full((4, 5, 5), expected.item()), atol=1e-4)
    grouped = G.MinibatchStdDev(group_size=2)(images)
    assert torch.allclose(grouped[0, 3, 0, 0], images[:2].std(0, unbiased=False).mean(), atol=1e-4)


def test_toy_networks():
    net = G.ToyDiscriminator(hidden=16, depth=2, spectral_norm=True, minibatch_std=True)
    assert net(torch.randn(10, 2)).shape == (10,)
    gen_net = G.ToyGenerator(latent_dim=3, hidden=16, depth=2)
    assert gen_net.sample(7, generator=gen()).shape == (7, 2)
    # spectral norm keeps the largest singular value of each weight at about 1
    for _ in range(5):
        net(torch.randn(10, 2))
    weight = net.body[0].weight
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("options", [dict(kind="non_saturating"), dict(kind="wgan-gp"),
                                     dict(kind="hinge", spectral_norm=True), dict(kind="wgan"),
                                     dict(kind="lsgan", minibatch_std=True, real_label=0.9),
                                     dict(kind="non_saturating", unrolled_steps=2),
                                     dict(kind="non_saturating", feature_matching=True,
                                          historical_weight=0.01)])
def test_train_toy_gan_runs_records_and_repeats(options):
    result = G.train_toy_gan("ring", steps=12, batch_size=32, hidden=16, snapshot_every=5,
                             snapshot_size=50, seed=3, **options)
    assert [s for s, _ in result.snapshots] == [0, 5, 10, 12]
    assert all(x.shape == (50, 2) for _, x in result.snapshots)
    assert all(len(v) == 12 and all(math.isfinite(a) for a in v) for v in result.history.values())
    again = G.train_toy_gan("ring", steps=12, batch_size=32, hidden=16, snapshot_every=5,
                            snapshot_size=50, seed=3, **options)
    assert torch.allclose(result.snapshots[-1][1], again.snapshots[-1][1])
    if options["kind"] == "wgan":
        assert all(p.abs().max() <= 0.01 for p in result.discriminator.parameters())


def test_toy_gan_learns_the_ring():
    result = G.train_toy_gan("ring", kind="non_saturating", steps=300, batch_size=128, hidden=64, lr=2e-3,
                             seed=0)
    samples = result.generator.sample(2000, generator=gen())
    # after a short run the samples at least sit near the circle of radius 2, not at the origin
    radius = samples.norm(dim=1)
    assert (radius - 2).abs().median() < 0.3
    start = G.ToyGenerator(hidden=64).sample(2000, generator=gen()).norm(dim=1)
    assert (start - 2).abs().median() > 1.0


# -- 4. DCGAN, conditioning and the tricks ---------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(hidden=32, batch_norm=False)])
def test_dcgan_generator_shapes_range_and_sampling(options):
    net = G.DCGANGenerator(latent_dim=8, base_channels=4, **options)
    images = net(torch.randn(5, 8))
    assert images.shape == (5, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    net.train()
    samples = net.sample(7, generator=gen())
    assert samples.shape == (7, 1, 28, 28) and net.training  # sampled in eval mode, mode restored
    assert not samples.requires_grad
    assert torch.equal(samples, net.sample(7, generator=gen()))


def test_conditional_generator_uses_the_label():
    net = G.DCGANGenerator(latent_dim=8, base_channels=4, num_classes=10).eval()
    z = torch.randn(3, 8, generator=gen())
    a = net(z, torch.tensor([1, 1, 1]))
    b = net(z, torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        net(z)
    assert net.sample(torch.tensor([4, 5]), generator=gen()).shape == (2, 1, 28, 28)
    assert net.sample(12).shape == (12, 1, 28, 28)


@pytest.mark.parametrize("options", [dict(), dict(spectral_norm=True, batch_norm=False),
                                     dict(minibatch_std=True, hidden=16), dict(num_classes=10)])
def test_dcgan_discriminator_shapes_and_features(options):
    net = G.DCGANDiscriminator(base_channels=4, **options).eval()  # eval: no power iteration
    x = torch.rand(8, 1, 28, 28, generator=gen())
    labels = torch.arange(8) % 10 if options.get("num_classes") else None
    logits, features = net(x, labels, return_features=True)
    assert logits.shape == (8,) and features.shape == (8, net.feature_dim)
    assert torch.allclose(net.features(x), features)
    if labels is not None:  # projection: the label changes the logit by <embed(y), features>
        other = net(x, (labels + 1) % 10)
        expected = ((net.embed(labels) - net.embed((labels + 1) % 10)) * features).sum(1)
        assert torch.allclose(logits - other, expected, atol=1e-5)


def test_spectral_norm_bounds_the_discriminator_layers():
    net = G.DCGANDiscriminator(base_channels=4, spectral_norm=True, batch_norm=False)
    for _ in range(10):  # power iteration settles over a few forward passes
        net(torch.rand(4, 1, 28, 28))
    weight = net.head.weight
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.05)


def test_minibatch_std_lets_the_discriminator_see_collapse():
    net = G.DCGANDiscriminator(base_channels=4, minibatch_std=True, batch_norm=False, minibatch_group=None)
    varied = torch.rand(6, 1, 28, 28, generator=gen())
    collapsed = varied[:1].expand(6, 1, 28, 28)
    h = net.conv(2 * collapsed - 1)
    assert net.minibatch_std(h)[:, -1].abs().max() < 1e-3
    assert net.minibatch_std(net.conv(2 * varied - 1))[:, -1].min() > 1e-3


def test_feature_matching_loss():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fake = torch.tensor([[0.0, 0.0], [2.0, 2.0]], requires_grad=True)
    loss = G.feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx((2 - 1) ** 2 + (3 - 1) ** 2)  # means (2, 3) vs (1, 1)
    loss.backward()
    assert fake.grad is not None
    assert G.feature_matching_loss(real, real.clone()).item() == 0


def test_historical_average_is_the_running_mean():
    layer = nn.Linear(2, 1)
    history = G.HistoricalAverage(layer)
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            layer.weight.fill_(value)
            layer.bias.fill_(-value)
        history.update(layer)
    # the mean of the weights after each of the three steps: (1 + 2 + 6) / 3 = 3
    assert torch.allclose(history.average["weight"], torch.full((1, 2), 3.0))
    assert torch.allclose(history.average["bias"], torch.full((1,), -3.0))
    penalty = history.penalty(layer)
    assert penalty.item() == pytest.approx(3 * (6.0 - 3.0) ** 2)  # two weights and the bias
    penalty.backward()
    assert torch.allclose(layer.weight.grad, torch.full((1, 2), 2 * 3.0))


# -- 5. instance norm and AdaIN -----------------------------------------------------------
def test_instance_norm_removes_per_image_channel_statistics():
    x = 3 + 5 * torch.randn(4, 2, 6, 6, generator=gen())
    normed = G.instance_norm(x)
    mean, std = G.channel_statistics(normed)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    # a per-channel affine change of the input is invisible after instance norm
    assert torch.allclose(G.instance_norm(2 * x + 7), normed, atol=1e-4)


def test_adain_injects_the_style_statistics():
    content = torch.randn(3, 2, 5, 5, generator=gen())
    style = 4 + 0.5 * torch.randn(3, 2, 5, 5, generator=gen(1))
    s_mean, s_std = G.channel_statistics(style)
    out = G.adain(content, s_mean, s_std)
    o_mean, o_std = G.channel_statistics(out)
    assert torch.allclose(o_mean, s_mean, atol=1e-5) and torch.allclose(o_std, s_std, atol=1e-3)
    assert torch.allclose(G.adain(content, s_mean[:, :, 0, 0], s_std[:, :, 0, 0]), out)
    # the spatial pattern is the content's: the same up to the per-channel affine map
    assert torch.allclose(G.instance_norm(out), G.instance_norm(content), atol=1e-3)
    module = G.AdaIN(2, style_dim=3)
    assert module(content, torch.randn(3, 3)).shape == content.shape


# -- 6. InfoGAN, matching, interpolation --------------------------------------------------
def test_info_loss_is_cross_entropy_and_bounds_the_mutual_information():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    codes = torch.tensor([0, 2])
    log_q = torch.log_softmax(logits, 1)
    assert G.info_loss(logits, codes).item() == pytest.approx(-(log_q[0, 0] + log_q[1, 2]).item() / 2)
    # a Q that ignores x gives CE = log K, so the bound log K - CE is 0
    assert G.info_loss(torch.zeros(4, 10), torch.arange(4)).item() == pytest.approx(math.log(10))
    head = G.InfoGANHead(feature_dim=6, num_codes=10, hidden=8)
    assert head(torch.randn(5, 6)).shape == (5, 10)


def test_linear_assignment_matches_brute_force():
    import itertools

    g = gen(8)
    for n in (1, 2, 3, 4, 5, 6):
        for _ in range(5):
            cost = torch.randint(0, 10, (n, n), generator=g).double()  # ties on purpose
            assignment = G.linear_assignment(cost)
            assert sorted(assignment.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert cost[torch.arange(n), assignment].sum().item() == pytest.approx(float(best))


def test_best_matching_accuracy():
    labels = torch.arange(100) % 10
    renamed = (labels * 3 + 1) % 10  # a permutation of the names: a perfect clustering
    assert G.best_matching_accuracy(renamed, labels) == 1.0
    wrong = renamed.clone()
    wrong[:5] = (wrong[:5] + 1) % 10
    assert G.best_matching_accuracy(wrong, labels) == pytest.approx(0.95)
    assert G.best_matching_accuracy(torch.zeros(100, dtype=torch.long), labels) == pytest.approx(0.1)


def test_interpolation():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    line = G.interpolate(z0, z1, steps=5, mode="lerp")
    arc = G.interpolate(z0, z1, steps=5, mode="slerp")
    assert line.shape == arc.shape == (5, 2)
    for path in (line, arc):
        assert torch.allclose(path[0], z0) and torch.allclose(path[-1], z1)
    assert torch.allclose(arc.norm(dim=1), torch.ones(5), atol=1e-6)  # on the circle
    assert line[2].norm() < 0.75  # the straight line cuts inside
    assert torch.allclose(arc[2], torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    batch = G.interpolate(torch.randn(3, 4), torch.randn(3, 4), steps=6)
    assert batch.shape == (6, 3, 4)
    same = G.interpolate(z0, z0, steps=3)  # parallel vectors fall back to the line
    assert torch.allclose(same, z0.expand(3, 2))


# -- 7. the registered models ---------------------------------------------------------------
def tiny_config(variant, **overrides):
    config = G.gan_config("smoke", variant)
    config.update({"latent_dim": 8, "g_channels": 4, "g_hidden": 16, "d_channels": 4, "d_hidden": 16,
                   "batch_size": 16, "steps": 6, "seed": 0, "time_limit": None,  # no clock: repeatable
                   **overrides})
    return config


@pytest.mark.parametrize("variant", G.VARIANTS)
def test_train_gan_on_given_tensors(variant):
    config = tiny_config(variant)
    model = G.build_gan(config)
    before = [p.detach().clone() for p in model.ema_generator.parameters()]
    images = torch.rand(64, 1, 28, 28, generator=gen())
    labels = torch.arange(64) % 10
    info = G.train_gan(model, config, "cpu", images=images, labels=labels, progress=False)
    assert info["train_steps"] == 6 and info["stopped_by"] == "steps"
    assert len(model.history["d_loss"]) == 6 and all(math.isfinite(v) for v in model.history["g_loss"])
    after = list(model.ema_generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the EMA moved
    samples = model.sample(torch.arange(5) if model.num_classes else 5, generator=gen())
    assert samples.shape == (5, 1, 28, 28)
    if variant == "infogan":
        assert len(model.history["info_loss"]) == 6 and model.info_head is not None
    # same seed, same config: the same weights
    again = G.build_gan(config)
    G.train_gan(again, config, "cpu", images=images, labels=labels, progress=False)
    assert all(torch.allclose(a, b) for a, b in zip(model.state_dict().values(),
                                                      again.state_dict().values(), strict=True))


def test_train_gan_respects_the_time_limit():
    config = tiny_config("dcgan", steps=10_000)
    model = G.build_gan(config)
    images = torch.rand(64, 1, 28, 28, generator=gen())
    info = G.train_gan(model, config, "cpu", max_seconds=1.0, images=images, progress=False)
    assert info["stopped_by"] == "max_seconds" and info["train_steps"] < 10_000


def test_configs_and_registry():
    from course_utils import registry

    for variant in ("dcgan", "wgan-gp", "cgan"):
        assert variant in registry.available()
        for budget_name in ("smoke", "classroom", "full"):
            config = G.gan_config(budget_name, variant)
            assert config["variant"] == variant and config["time_limit"] > 0
            assert registry.get(variant).make_config(budget_name) == config
    assert G.gan_config("classroom")["time_limit"] <= 360  # the six minutes
    assert G.gan_config("smoke", "cgan")["num_classes"] == 10
    critic = G.build_gan(G.gan_config("smoke", "wgan-gp")).discriminator
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())  # GP is per sample
    with pytest.raises(ValueError):
        G.gan_config("smoke", "stylegan")


def test_course_train_dcgan_in_smoke(tmp_path, data_dir, monkeypatch):
    """`course train dcgan --budget smoke`, run as a user would: checkpoint, metrics.json, sane figures."""
    import json
    import subprocess
    import sys

    from course_utils import checkpoints, registry

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "course_utils.cli", "train", "dcgan", "--budget", "smoke",
         "--max-seconds", "30", "--out", str(out), "--checkpoint-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {"fid", "kid", "precision", "recall", "classifier_score", "confident_fraction",
            "class_entropy", "n_samples", "floor_fid", "floor_kid", "floor_precision", "floor_recall",
            "floor_confident_fraction", "floor_class_entropy", "nn_distance_ratio", "train_steps"}
    assert keys <= set(metrics)
    assert metrics["model"] == "dcgan" and metrics["budget"] == "smoke"
    assert "8,000/2,000" in metrics["train_data"] and metrics["train_seconds"] < 60
    assert metrics["n_samples"] == G.gan_config("smoke")["eval_samples"]
    for key in ("precision", "recall", "confident_fraction", "floor_precision", "floor_recall"):
        assert 0 <= metrics[key] <= 1
    assert 0 <= metrics["class_entropy"] <= math.log(10) + 1e-6
    # real digits against real digits: the floor is far below a 60-step GAN
    assert metrics["floor_fid"] < metrics["fid"] and metrics["floor_confident_fraction"] > 0.8
    assert metrics["floor_recall"] > 0.5
    # the checkpoint is the one a notebook asks for with course_train_config
    monkeypatch.setenv("COURSE_TEST_SPLIT", "1")
    config = G.course_train_config("smoke", "dcgan")
    assert config == registry.training_config("dcgan", "smoke", 0, max_seconds=30)
    model = G.build_gan(config)
    sidecar = checkpoints.load_checkpoint("dcgan", model, config, directory=tmp_path / "ckpt")
    assert sidecar is not None and sidecar["metrics"]["fid"] == metrics["fid"]
    assert model.sample(4, generator=gen()).shape == (4, 1, 28, 28)


def test_recalibrate_batch_norm_measures_the_generators_own_statistics():
    net = G.DCGANGenerator(latent_dim=8, base_channels=4, hidden=16)
    first_norm = net.fc[1]
    with torch.no_grad():
        first_norm.running_mean.fill_(100.0)  # statistics that belong to other weights
        first_norm.running_var.fill_(100.0)
    G.recalibrate_batch_norm(net, {}, gen(), "cpu", batches=10, batch_size=200)
    assert not net.training and first_norm.momentum == 0.1  # eval mode and momentum restored
    with torch.no_grad():
        pre_norm = net.fc[0](torch.randn(4000, 8, generator=gen(1)))
    assert torch.allclose(first_norm.running_mean, pre_norm.mean(0), atol=0.1)  # was 100
    assert torch.allclose(first_norm.running_var, pre_norm.var(0), rtol=0.25, atol=0.02)


def test_toy_tricks_change_the_training():
    common = dict(steps=30, batch_size=32, hidden=16, seed=5)
    plain = G.train_toy_gan("ring", **common).generator.sample(100, generator=gen())
    for trick in (dict(feature_matching=True), dict(historical_weight=0.1), dict(real_label=0.9),
                  dict(minibatch_std=True)):
        other = G.train_toy_gan("ring", **common, **trick).generator.sample(100, generator=gen())
        assert not torch.allclose(plain, other), trick


def test_wgan_with_clipping_on_images():
    config = tiny_config("dcgan", loss="wgan", clip_weights=0.02, d_spectral_norm=False)
    model = G.build_gan(config)
    G.train_gan(model, config, "cpu", images=torch.rand(64, 1, 28, 28, generator=gen()), progress=False)
    assert all(p.abs().max() <= 0.02 for p in model.discriminator.parameters())

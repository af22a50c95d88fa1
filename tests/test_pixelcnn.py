"""Topic 5 library: masks, causality (by gradients), exact likelihoods, sampling, WaveNet."""

import itertools
import math

import pytest
import torch

from course_utils import pixelcnn as ar


def all_binary_images(height, width):
    """Every binary image of this size: 2^(H W) of them, B x 1 x H x W."""
    grid = list(itertools.product([0.0, 1.0], repeat=height * width))
    return torch.tensor(grid).reshape(-1, 1, height, width)


def test_bits_per_dim_and_back():
    assert ar.bits_per_dim(100.0, 784) == pytest.approx(100 / (784 * math.log(2)))
    assert ar.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert ar.nats_per_image(ar.bits_per_dim(81.3, 784), 784) == pytest.approx(81.3)
    with pytest.raises(ValueError):
        ar.bits_per_dim(1.0, 0)


def test_quantize_covers_every_level_and_dequantize_centres_them():
    x = torch.linspace(0, 1, 1001)
    classes = ar.quantize(x, 16)
    assert classes.min() == 0 and classes.max() == 15 and len(classes.unique()) == 16
    assert (ar.dequantize(classes, 16) - x).abs().max() <= 1 / 32 + 1e-6


@pytest.mark.parametrize("k", [3, 5, 7])
def test_causal_masks_hide_the_future_and_type_a_the_centre(k):
    a, b = ar.causal_mask(k, "A"), ar.causal_mask(k, "B")
    c = k // 2
    assert a[c, c] == 0 and b[c, c] == 1
    assert (b - a).sum() == 1
    assert a.sum() == k * k // 2                     # the rows above and the left half of the centre row
    assert a[c + 1:].sum() == 0 and b[c, c + 1:].sum() == 0
    with pytest.raises(ValueError):
        ar.causal_mask(k, "C")


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_a_masked_convolution_sees_exactly_its_mask(mask_type):
    torch.manual_seed(0)
    conv = ar.MaskedConv2d(1, 4, 5, mask_type)
    seen = ar.dependency_map(conv, (1, 9, 9), (4, 4)) > 0
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7, 2:7] = ar.causal_mask(5, mask_type).bool()
    assert torch.equal(seen, expected)


@pytest.mark.parametrize("model_fn", [
    lambda: ar.PixelCNN(channels=8, num_blocks=3),
    lambda: ar.GatedPixelCNN(channels=8, num_layers=4),
    lambda: ar.PixelCNN(channels=8, num_blocks=2, levels=4),
    lambda: ar.GatedPixelCNN(channels=8, num_layers=3, levels=4, num_classes=10),
])
def test_no_output_depends_on_its_own_or_a_later_pixel(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    y = torch.tensor([3]) if model.num_classes else None
    for position in [(0, 0), (0, 5), (4, 0), (6, 6), (11, 11), (11, 3)]:
        seen = ar.dependency_map(model, (1, 12, 12), position, y=y)
        future = ar.future_mask(12, 12, position)
        assert seen[future].sum() == 0, f"output {position} sees the future"
        if position != (0, 0):
            assert seen[~future].sum() > 0


def test_plain_pixelcnn_has_a_blind_spot_and_the_gated_one_does_not():
    torch.manual_seed(0)
    plain = ar.PixelCNN(channels=8, num_blocks=6, kernel_size=3)
    gated = ar.GatedPixelCNN(channels=8, num_layers=7, kernel_size=3)
    position = (10, 10)
    # pixels just above and to the right: within reach of seven 3x3 layers by their size alone
    region = [(r, c) for r in range(7, 10) for c in range(12, 16)]
    plain_seen = ar.dependency_map(plain, (1, 16, 16), position)
    gated_seen = ar.dependency_map(gated, (1, 16, 16), position)
    blind = [p for p in region if plain_seen[p] == 0]
    assert len(blind) >= 8, "the plain PixelCNN should miss pixels up and to the right"
    assert all(gated_seen[p] > 0 for p in region), "the gated PixelCNN should see all of them"
    past = ~ar.future_mask(16, 16, position)
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[4:11, 4:17] = True                          # within 6 rows and 6 columns
    assert (gated_seen[past & near] > 0).all()


def test_made_masks_follow_the_ordering():
    torch.manual_seed(0)
    ordering = torch.randperm(10) + 1
    made = ar.MADE(num_inputs=10, hidden_sizes=(32, 32), ordering=ordering, seed=1)
    x = torch.rand(1, 10)
    jacobian = torch.autograd.functional.jacobian(lambda v: made(v)[0], x)[:, 0, :]  # out x in
    allowed = ordering[None, :] < ordering[:, None]  # input j comes before output d
    assert jacobian[~allowed].abs().sum() == 0
    first = int(torch.argmin(ordering))
    assert jacobian[first].abs().sum() == 0            # the first in order depends on nothing
    assert jacobian[int(torch.argmax(ordering))].abs().sum() > 0


def test_made_rejects_an_ordering_that_is_not_a_permutation():
    with pytest.raises(ValueError):
        ar.made_masks(torch.tensor([1, 1, 2]), [4])


@pytest.mark.parametrize("model_fn", [
    lambda: ar.MADE(num_inputs=6, hidden_sizes=(16,)),
    lambda: ar.PixelCNN(channels=4, num_blocks=2, kernel_size=3),
    lambda: ar.GatedPixelCNN(channels=4, num_layers=3, kernel_size=3),
])
def test_the_likelihood_is_exact_it_sums_to_one_over_all_images(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    for p in model.parameters():
        p.data.normal_(0, 0.5)  # far from a uniform model
    images = all_binary_images(2, 3)
    log_p = ar.log_likelihood(model, images)
    assert torch.logsumexp(log_p.double(), 0).item() == pytest.approx(0.0, abs=1e-5)
    assert log_p.std() > 0.1


def test_grey_level_likelihood_sums_to_one():
    torch.manual_seed(0)
    model = ar.GatedPixelCNN(channels=4, num_layers=2, kernel_size=3, levels=3)
    grid = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(-1, 1, 2, 2)
    log_p = ar.log_likelihood(model, grid)
    assert torch.logsumexp(log_p.double(), 0).item() == pytest.approx(0.0, abs=1e-5)


def test_sampling_repeats_with_a_seed_and_cropping_changes_nothing():
    torch.manual_seed(0)
    model = ar.GatedPixelCNN(channels=8, num_layers=3, kernel_size=3)
    draw = lambda crop: ar.sample(model, 4, (1, 10, 5), generator=torch.Generator().manual_seed(5),  # noqa: E731
                                  crop_rows=crop)
    a, b, c = draw(True), draw(True), draw(False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and a.shape == (4, 1, 10, 5)
    other = ar.sample(model, 4, (1, 10, 5), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, other)


@pytest.mark.parametrize("levels,num_classes", [(2, None), (4, 10)])
def test_gated_sampling_runs_the_vertical_stacks_once_per_row_for_the_same_samples(levels, num_classes):
    torch.manual_seed(0)
    model = ar.GatedPixelCNN(channels=6, num_layers=3, kernel_size=5, levels=levels,
                             num_classes=num_classes).eval()
    y = torch.tensor([1, 7]) if num_classes else None
    x = torch.randint(0, levels, (2, 1, 9, 6)).float()
    model_input = x.long() if levels > 2 else x
    # the horizontal stacks on one row, with that row of the links, give that row of the logits
    links = model.vertical_links(model_input, y)
    full = model(model_input, y)
    for row in (0, 4, 8):
        one_row = model.horizontal_logits(model_input[:, :, row:row + 1],
                                          [link[:, :, row:row + 1] for link in links], y)
        assert torch.allclose(one_row[:, :, 0], full[:, :, row], atol=1e-5)
    # and the links into a row do not depend on that row or any below it
    changed = model_input.clone()
    changed[:, :, 4:] = levels - 1 - changed[:, :, 4:]
    for before, after in zip(links, model.vertical_links(changed, y), strict=True):
        assert torch.equal(before[:, :, :5], after[:, :, :5]) and not torch.equal(before, after)
    calls = []
    model.layers[0].vertical.register_forward_hook(lambda *args: calls.append(1))
    draw = lambda **kw: ar.sample(model, 2, (1, 9, 6), y=y,  # noqa: E731
                                  generator=torch.Generator().manual_seed(3), **kw)
    reused = draw()
    assert len(calls) == 9  # once per row, not once per pixel
    assert torch.equal(reused, draw(reuse_vertical=False))
    assert torch.equal(reused, draw(reuse_vertical=False, crop_rows=False))


def test_sampling_follows_the_model():
    # a PixelCNN whose logits are a constant bias: pixels are independent Bernoulli(sigmoid(b))
    model = ar.PixelCNN(channels=4, num_blocks=1, kernel_size=3)
    for p in model.parameters():
        p.data.zero_()
    model.head[-1].bias.data.fill_(math.log(0.8 / 0.2))
    images = ar.sample(model, 64, (1, 6, 6), generator=torch.Generator().manual_seed(0))
    assert images.mean().item() == pytest.approx(0.8, abs=0.05)


def test_conditional_sampling_and_grey_levels():
    torch.manual_seed(0)
    model = ar.PixelCNN(channels=4, num_blocks=1, kernel_size=3, levels=5, num_classes=10)
    images = ar.sample(model, y=torch.tensor([1, 2, 3]), shape=(1, 5, 5),
                       generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 5, 5)
    assert images.min() >= 0 and images.max() <= 4 and torch.equal(images, images.round())


def test_completion_keeps_the_given_rows():
    torch.manual_seed(0)
    model = ar.GatedPixelCNN(channels=4, num_layers=2, kernel_size=3)
    given = (torch.rand(3, 1, 8, 8) > 0.5).float()
    completed = ar.complete(model, given, rows_given=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(completed[:, :, :5], given[:, :, :5])
    assert not torch.equal(completed[:, :, 5:], given[:, :, 5:])


@pytest.mark.parametrize("k, dilations, expected", [(2, [1, 2, 4, 8], 16), (3, [1, 2, 4], 15),
                                                    (2, [1, 2, 4, 1, 2, 4], 15)])
def test_receptive_field_formula(k, dilations, expected):
    assert ar.receptive_field(k, dilations) == expected


def test_wavenet_is_causal_and_sees_exactly_its_receptive_field():
    torch.manual_seed(0)
    net = ar.WaveNet(levels=8, channels=8, layers_per_stack=4, kernel_size=2)
    assert net.receptive_field == 2 + 1 + 2 + 4 + 8
    steps, t = 40, 30
    x = torch.rand(1, 8, steps, requires_grad=True)
    net.from_one_hot(x)[0, :, t].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert not seen[t:].any()
    assert seen[:t].nonzero().min().item() == t - net.receptive_field
    assert seen[t - net.receptive_field:t].all()


def test_wavenet_generates_from_a_prompt():
    torch.manual_seed(0)
    net = ar.WaveNet(levels=8, channels=8, layers_per_stack=3)
    prompt = torch.randint(0, 8, (2, 5))
    out = net.generate(10, prompt, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    again = net.generate(10, prompt, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_mu_law_round_trip():
    x = torch.linspace(-1, 1, 2001)
    back = ar.mu_law_decode(ar.mu_law_encode(x, 256), 256)
    assert (back - x).abs().max() < 0.03
    small = x.abs() < 0.01                      # finer steps near zero: the point of the mu-law
    assert (back - x)[small].abs().max() < 0.001


@pytest.mark.parametrize("variant", ar.VARIANTS)
def test_training_lowers_the_held_out_nll(variant):
    torch.manual_seed(0)
    config = dict(ar.pixelcnn_config("smoke", variant), epochs=10, time_limit=None, seed=0, lr=5e-3)
    model = ar.build_pixelcnn(config)
    # a toy data set with structure to learn: vertical bars at random columns
    images = torch.zeros(256, 1, 28, 28)
    images[torch.arange(256), 0, :, torch.randint(0, 28, (256,))] = 1.0
    before = ar.held_out_nll(model, images[:64])
    info = ar.train_pixelcnn(model, config, "cpu", images=images, progress=False, live_plot=False)
    after = ar.held_out_nll(model, images[:64])
    assert info["train_steps"] == 10 * 4
    assert after < 0.5 * before, (before, after)
    assert ar.build_pixelcnn(config).state_dict().keys() == model.state_dict().keys()


def test_the_grey_level_variant_trains_on_classes_and_reports_bits_per_dim():
    torch.manual_seed(0)
    config = dict(ar.pixelcnn_config("smoke", ar.GREY_VARIANT), epochs=10, time_limit=None, seed=0, lr=5e-3)
    assert config["levels"] == ar.GREY_LEVELS == 16 and config["model"] == "gated-pixelcnn"
    model = ar.build_pixelcnn(config)
    assert model.levels == 16
    # grey bars: a mid-grey column next to a white one, never binarized
    images = torch.zeros(256, 1, 28, 28)
    columns = torch.randint(0, 27, (256,))
    images[torch.arange(256), 0, :, columns] = 0.5
    images[torch.arange(256), 0, :, columns + 1] = 1.0
    classes = ar.quantize(images[:64], 16)
    assert set(classes.unique().tolist()) == {0, 8, 15}
    before = ar.held_out_nll(model, classes)
    ar.train_pixelcnn(model, config, "cpu", images=images, progress=False, live_plot=False)
    after = ar.held_out_nll(model, classes)
    assert after < 0.5 * before, (before, after)
    assert ar.bits_per_dim(after, 784) < 0.5 * ar.bits_per_dim(before, 784)


@pytest.mark.parametrize("model", [ar.PixelCNN(channels=4, num_blocks=3, kernel_size=5),
                                   ar.GatedPixelCNN(channels=4, num_layers=3, kernel_size=5)])
def test_rows_above_is_the_exact_reach_of_the_receptive_field(model):
    torch.manual_seed(0)
    row = 15
    seen = ar.dependency_map(model, (1, 20, 20), (row, 10))
    seen_rows = seen.sum(1).nonzero().flatten()
    assert seen_rows.min().item() == row - model.rows_above

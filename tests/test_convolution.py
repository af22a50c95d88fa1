"""course_utils.convolution: size formulas, convolution matrices, overlap counts, the seed AE."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from course_utils.convolution import (
    SEED_DECODER_LAYERS,
    SEED_ENCODER_LAYERS,
    SeedConvAutoencoder,
    UpsampleConv,
    conv1d_matrix,
    conv2d_matrix,
    conv_output_size,
    conv_transpose_output_size,
    describe_transposed_conv,
    output_padding_to_invert,
    overlap_figure,
    transposed_conv_explorer,
    transposed_conv_overlap,
    upsample_conv,
)

SWEEP = list(itertools.product(range(1, 12), range(1, 6), range(1, 4), range(0, 3), range(1, 3)))


def valid_conv(n, k, s, p, d):
    return n + 2 * p >= d * (k - 1) + 1


# -- output sizes --------------------------------------------------------------------------
def test_conv_output_size_matches_conv1d_over_a_sweep():
    checked = 0
    for n, k, s, p, d in SWEEP:
        if not valid_conv(n, k, s, p, d):
            with pytest.raises(ValueError):
                conv_output_size(n, k, s, p, d)
            continue
        layer = nn.Conv1d(1, 1, k, stride=s, padding=p, dilation=d, bias=False)
        assert conv_output_size(n, k, s, p, d) == layer(torch.zeros(1, 1, n)).shape[-1], (n, k, s, p, d)
        checked += 1
    assert checked > 500


def test_conv_output_size_per_axis_matches_conv2d():
    for (h, w), (kh, kw), (sh, sw), (ph, pw) in [((28, 20), (5, 4), (1, 2), (0, 1)),
                                                 ((9, 9), (3, 3), (2, 2), (1, 1)),
                                                 ((7, 12), (1, 5), (3, 1), (2, 0))]:
        layer = nn.Conv2d(1, 1, (kh, kw), stride=(sh, sw), padding=(ph, pw))
        expected = tuple(layer(torch.zeros(1, 1, h, w)).shape[-2:])
        assert conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw)) == expected
    assert conv_output_size((28, 28), 5) == (24, 24)  # ints broadcast over the axes


def test_conv_transpose_output_size_matches_conv_transpose1d_over_a_sweep():
    checked = 0
    for n, k, s, p, d in SWEEP:
        for op in range(max(s, d)):
            full = (n - 1) * s + d * (k - 1) + 1 + op
            if full - 2 * p < 1:
                with pytest.raises(ValueError):
                    conv_transpose_output_size(n, k, s, p, op, d)
                continue
            layer = nn.ConvTranspose1d(1, 1, k, stride=s, padding=p, output_padding=op, dilation=d)
            expected = layer(torch.zeros(1, 1, n)).shape[-1]
            assert conv_transpose_output_size(n, k, s, p, op, d) == expected, (n, k, s, p, op, d)
            checked += 1
    assert checked > 700


def test_conv_transpose_output_size_2d_and_bad_output_padding():
    layer = nn.ConvTranspose2d(1, 1, (3, 4), stride=(2, 3), padding=(1, 0), output_padding=(1, 2))
    expected = tuple(layer(torch.zeros(1, 1, 5, 6)).shape[-2:])
    assert conv_transpose_output_size((5, 6), (3, 4), (2, 3), (1, 0), (1, 2)) == expected
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose_output_size(5, 3, stride=2, output_padding=2)
    with pytest.raises(TypeError):
        conv_output_size(5.0, 3)


def test_output_padding_to_invert_recovers_every_input_size():
    for n, k, s, p, d in SWEEP:
        if not valid_conv(n, k, s, p, d):
            continue
        o = conv_output_size(n, k, s, p, d)
        op = output_padding_to_invert(n, k, s, p, d)
        assert 0 <= op < s
        assert conv_transpose_output_size(o, k, s, p, op, d) == n, (n, k, s, p, d)


# -- convolution as a matrix ------------------------------------------------------------
@pytest.mark.parametrize("n,k,s,p,d", [(7, 3, 1, 0, 1), (9, 3, 2, 1, 1), (8, 3, 2, 0, 1),
                                       (10, 4, 3, 2, 1), (11, 3, 1, 2, 2), (5, 1, 1, 0, 1)])
def test_conv1d_matrix_is_conv1d_and_its_transpose_is_conv_transpose1d(n, k, s, p, d):
    g = torch.Generator().manual_seed(n * 100 + k)
    kernel = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    C = conv1d_matrix(kernel, n, stride=s, padding=p, dilation=d)
    o = conv_output_size(n, k, s, p, d)
    assert C.shape == (o, n) and C.dtype == torch.float64
    y = F.conv1d(x.view(1, 1, -1), kernel.view(1, 1, -1), stride=s, padding=p, dilation=d)
    assert torch.allclose(C @ x, y.flatten())
    # the transpose: a transposed conv (output_padding restores the exact length n)
    g_out = torch.randn(o, generator=g, dtype=torch.float64)
    op = output_padding_to_invert(n, k, s, p, d)
    back = F.conv_transpose1d(g_out.view(1, 1, -1), kernel.view(1, 1, -1), stride=s, padding=p,
                              output_padding=op, dilation=d)
    assert torch.allclose(C.T @ g_out, back.flatten())
    # ... and the gradient of <g, conv(x)> with respect to x
    x_var = x.clone().requires_grad_(True)
    out = F.conv1d(x_var.view(1, 1, -1), kernel.view(1, 1, -1), stride=s, padding=p, dilation=d)
    (grad,) = torch.autograd.grad((out.flatten() * g_out).sum(), x_var)
    assert torch.allclose(grad, C.T @ g_out)


def test_conv1d_matrix_seed_example_and_accepts_lists():
    C = conv1d_matrix([1, 2, 3], 7)
    x = torch.tensor([0.0, 0, 1, 0, 0, 0, 0])
    assert C.shape == (5, 7)
    assert (C @ x).tolist() == [3.0, 2.0, 1.0, 0.0, 0.0]
    assert (conv1d_matrix([1, 2, 3], 9).T @ x).tolist() == [0, 0, 1, 2, 3, 0, 0, 0, 0]
    kernel = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3)   # an (out, in, k) weight works too
    assert torch.equal(conv1d_matrix(kernel, 7), C)


def test_conv1d_matrix_is_differentiable_in_the_kernel():
    kernel = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    x = torch.randn(6)
    (conv1d_matrix(kernel, 6) @ x).sum().backward()
    kernel_ref = kernel.detach().clone().requires_grad_(True)
    F.conv1d(x.view(1, 1, -1), kernel_ref.view(1, 1, -1)).sum().backward()
    assert torch.allclose(kernel.grad, kernel_ref.grad)


@pytest.mark.parametrize("shape,k,s,p", [((4, 4), 3, 1, 0), ((5, 5), 3, 2, 1),
                                         ((6, 7), (2, 3), (1, 2), (1, 0))])
def test_conv2d_matrix_is_conv2d_and_its_transpose_is_conv_transpose2d(shape, k, s, p):
    g = torch.Generator().manual_seed(1)
    kh, kw = k if isinstance(k, tuple) else (k, k)
    kernel = torch.randn(kh, kw, generator=g, dtype=torch.float64)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    C = conv2d_matrix(kernel, shape, stride=s, padding=p)
    out_shape = conv_output_size(shape, (kh, kw), s, p)
    assert C.shape == (out_shape[0] * out_shape[1], shape[0] * shape[1])
    y = F.conv2d(x[None, None], kernel[None, None], stride=s, padding=p)
    assert torch.allclose(C @ x.flatten(), y.flatten())
    g_out = torch.randn(*out_shape, generator=g, dtype=torch.float64)
    op = output_padding_to_invert(shape, (kh, kw), s, p)
    back = F.conv_transpose2d(g_out[None, None], kernel[None, None], stride=s, padding=p,
                              output_padding=op)
    assert torch.allclose(C.T @ g_out.flatten(), back.flatten())


def test_conv2d_matrix_classic_4x4_example_and_channels():
    C = conv2d_matrix(torch.arange(1.0, 10.0).view(3, 3), (4, 4))
    assert C.shape == (4, 16)
    assert C[0].tolist() == [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0, 0]
    assert C[3].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9]
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)             # 2 -> 3 channels
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    C = conv2d_matrix(weight, (5, 6), stride=2, padding=1)
    assert torch.allclose(C @ x.flatten(), F.conv2d(x[None], weight, stride=2, padding=1).flatten())
    with pytest.raises(ValueError):
        conv2d_matrix(torch.ones(3), (4, 4))


# -- overlap counts --------------------------------------------------------------------
@pytest.mark.parametrize("n,k,s,p,op", [(5, 3, 2, 0, 0), (5, 3, 2, 1, 1), (4, 4, 2, 1, 0),
                                        (6, 5, 3, 2, 2), (3, 2, 1, 0, 0), (4, 3, 3, 0, 2)])
def test_overlap_equals_conv_transpose_of_ones(n, k, s, p, op):
    counts = transposed_conv_overlap(n, k, s, p, op)
    ones = F.conv_transpose1d(torch.ones(1, 1, n), torch.ones(1, 1, k), stride=s, padding=p,
                              output_padding=op)
    assert counts.dtype == torch.long
    assert counts.tolist() == ones.flatten().long().tolist()
    assert len(counts) == conv_transpose_output_size(n, k, s, p, op)


def test_overlap_sums_to_n_times_k_without_cropping():
    for n, k, s in itertools.product(range(1, 8), range(1, 6), range(1, 4)):
        assert int(transposed_conv_overlap(n, k, s).sum()) == n * k


def test_overlap_is_uniform_in_the_interior_exactly_when_the_stride_divides_the_kernel():
    for k, s in itertools.product(range(1, 7), range(1, 4)):
        counts = transposed_conv_overlap(12, k, s)
        interior = counts[k:-k]
        assert int(interior.min()) == k // s
        assert int(interior.max()) == -(-k // s)
        assert (interior.min() == interior.max()) == (k % s == 0), (k, s)


def test_overlap_2d_is_the_outer_product_and_matches_conv_transpose2d():
    counts = transposed_conv_overlap((4, 5), 3, 2, 1, (1, 0))
    ones = F.conv_transpose2d(torch.ones(1, 1, 4, 5), torch.ones(1, 1, 3, 3), stride=2, padding=1,
                              output_padding=(1, 0))
    assert counts.tolist() == ones[0, 0].long().tolist()
    checker = transposed_conv_overlap((5, 5), 3, 2)
    assert set(checker[2:-2, 2:-2].unique().tolist()) == {1, 2, 4}   # the checkerboard
    flat = transposed_conv_overlap((5, 5), 4, 2)
    assert flat[3:-3, 3:-3].unique().tolist() == [4]


def test_describe_and_figure():
    text = describe_transposed_conv(5, 3, 2, 1, 1)
    assert "= 10" in text and "uneven" in text and "= n" in text
    assert "uniform" in describe_transposed_conv(5, 4, 2, 1)
    assert "not a valid" in describe_transposed_conv(5, 3, 2, 0, 2)
    import matplotlib.pyplot as plt

    fig = overlap_figure(4, 3, 2)
    assert len(fig.axes) == 3  # bars, count map, colour bar
    plt.close(fig)


def test_explorer_widget_builds_without_a_kernel():
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    widget = transposed_conv_explorer()
    assert isinstance(widget, widgets.VBox)
    sliders = [w for w in widget.children[0].children if isinstance(w, widgets.IntSlider)]
    assert [s.description for s in sliders] == ["input size n", "kernel k", "stride s",
                                                "padding p", "output_padding"]
    sliders[4].value = 3  # an invalid output_padding is explained, not raised
    sliders[2].value = 4
    plt.close("all")


# -- upsample + conv -----------------------------------------------------------------------
def test_upsample_conv_sizes_and_constant_input():
    layer = UpsampleConv(3, 5, kernel_size=3)
    assert layer(torch.randn(2, 3, 7, 9)).shape == (2, 5, 14, 18)
    assert upsample_conv(1, 1, kernel_size=5, scale_factor=3)(torch.randn(1, 1, 4, 4)).shape == (1, 1, 12, 12)
    with torch.no_grad():
        out = layer(torch.ones(1, 3, 6, 6))[..., 1:-1, 1:-1]      # away from the zero padding
    assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-6)


# -- the seed autoencoder --------------------------------------------------------------------
def test_seed_autoencoder_shapes():
    torch.manual_seed(0)
    model = SeedConvAutoencoder()
    x = torch.rand(3, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (3, 8, 1, 1)
    out = model(x)
    assert out.shape == (3, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(model.decode(z.flatten(1)), out)
    assert isinstance(model.encoder, nn.Sequential) and isinstance(model.decoder, nn.Sequential)
    logits = SeedConvAutoencoder(output="logits")
    assert not isinstance(logits.decoder[-1], nn.Sigmoid)
    with pytest.raises(ValueError):
        SeedConvAutoencoder(output="tanh")


def test_seed_autoencoder_output_bias_starts_at_the_mean_pixel():
    model = SeedConvAutoencoder().init_output_bias(0.13)
    with torch.no_grad():
        out = model.decode(torch.zeros(2, 8))          # zero code: only the biases act
    assert torch.allclose(out[..., 8:20, 8:20], torch.full_like(out[..., 8:20, 8:20], 0.13), atol=0.1)
    assert model.decoder[8].bias.item() == pytest.approx(torch.logit(torch.tensor(0.13)).item())
    with pytest.raises(ValueError):
        model.init_output_bias(1.5)


def test_seed_autoencoder_layer_shapes_follow_the_formulas():
    model = SeedConvAutoencoder()
    rows = model.layer_shapes((1, 28, 28))
    assert [r.shape for r in rows] == [
        (1, 28, 28), (32, 24, 24), (32, 20, 20), (32, 9, 9), (32, 4, 4), (8, 1, 1),
        (32, 4, 4), (32, 9, 9), (32, 20, 20), (32, 24, 24), (1, 28, 28)]
    size = 28
    for (_, c_out, k, s), row in zip(SEED_ENCODER_LAYERS, rows[1:6], strict=True):
        size = conv_output_size(size, k, s)
        assert row.shape == (c_out, size, size) and row.part == "encoder"
    for (_, c_out, k, s), row in zip(SEED_DECODER_LAYERS, rows[6:], strict=True):
        size = conv_transpose_output_size(size, k, s)
        assert row.shape == (c_out, size, size) and row.part == "decoder"
    convs = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(8, 32), (32, 32), (32, 32),
                                                                (32, 32), (32, 1)]
    assert len(model.layer_shapes(all_layers=True)) == 1 + 9 + 10
    assert "ConvTranspose2d(8, 32" in model.shape_table()

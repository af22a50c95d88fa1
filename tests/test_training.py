import pytest
import torch
from torch import nn

from course_utils.training import EMA, History, fit


def regression_problem(n=256, seed=0):
    """y = 3x - 1 plus a little noise: a loss that must fall."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    y = 3 * x - 1 + 0.01 * torch.randn(n, 1, generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def mse(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"abs_error": (model(x) - y).abs().mean()}


def test_loss_falls_and_history_is_recorded():
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    result = fit(model, mse, regression_problem(), epochs=20, lr=0.05, device="cpu")
    h = result.history
    assert result.step == 20 * 8 == len(h.losses) and result.epoch == 20
    assert h.stopped_by == "epochs" and len(h.epoch_ends) == 20
    assert h.losses[-1] < 0.01 * h.losses[0]
    assert len(h.logs["abs_error"]) == len(h.losses)
    assert model.weight.item() == pytest.approx(3, abs=0.05)


def test_steps_and_seconds_limits():
    result = fit(nn.Linear(1, 1), mse, regression_problem(), steps=13, device="cpu")
    assert result.step == 13 and result.history.stopped_by == "steps"
    result = fit(nn.Linear(1, 1), mse, regression_problem(), max_seconds=0.2, device="cpu")
    assert result.history.stopped_by == "max_seconds"
    assert 0.2 <= result.history.seconds < 2.0
    with pytest.raises(ValueError, match="limit"):
        fit(nn.Linear(1, 1), mse, regression_problem(), device="cpu")


def test_gradient_clipping_bounds_the_update():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 100.0)  # a huge initial gradient
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = [(torch.ones(4, 1), torch.zeros(4, 1))]
    fit(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch, optimizer=opt, steps=1,
        clip_grad_norm=0.5, device="cpu")
    assert model.weight.item() == pytest.approx(99.5)  # one step of length exactly 0.5


def test_ema_tracks_a_running_average():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.model.weight.data.fill_(1.0)
    ema.updates = 100  # past warm-up, so the decay is exactly 0.5
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.5)
    result = fit(nn.Linear(1, 1), mse, regression_problem(), epochs=3, ema_decay=0.9, device="cpu")
    assert result.ema is not None and result.ema.updates == result.step
    assert not any(p.requires_grad for p in result.ema.model.parameters())


def test_checkpoint_resume_continues_where_it_stopped(tmp_path):
    path = tmp_path / "state.pt"
    torch.manual_seed(0)
    straight = fit(nn.Linear(1, 1), mse, regression_problem(), steps=16, device="cpu",
                   optimizer=None, lr=0.05)
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    first = fit(model, mse, regression_problem(), steps=8, lr=0.05, device="cpu", checkpoint=path)
    assert path.exists() and first.step == 8
    fresh = nn.Linear(1, 1)
    resumed = fit(fresh, mse, regression_problem(), steps=16, lr=0.05, device="cpu",
                  checkpoint=path, resume=True)
    assert resumed.step == 16 and len(resumed.history.losses) == 16
    # same data order within each epoch, so resuming reproduces the uninterrupted run
    assert torch.allclose(fresh.weight, straight.model.weight, atol=1e-6)


def test_diverging_loss_is_reported():
    def bad_loss(model, batch):
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="learning rate"):
        fit(nn.Linear(1, 1), bad_loss, regression_problem(), steps=3, device="cpu")


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        fit(nn.Linear(1, 1), mse, [], epochs=2, device="cpu")


def test_history_smoothing():
    h = History(losses=[4.0, 2.0, 0.0, 2.0])
    assert h.smoothed(window=2) == [4.0, 3.0, 1.0, 1.0]

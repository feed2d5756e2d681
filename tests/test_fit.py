"""fit(): maximum likelihood with early stopping, best-state restore, learning-rate schedules,
a time budget, quiet progress in logs, input checks and exact checkpoint resume."""

import doctest
import io
import math

import _atlases as A
import pytest
import torch

import atlasdist.training.mle as mle
from atlasdist import AtlasFlow
from atlasdist.training import FitHistory, fit


def circle_data(n, seed=0, mean=1.0):
    gen = torch.Generator().manual_seed(seed)
    angle = 0.5 * torch.randn(n, generator=gen, dtype=torch.float64) + mean
    return torch.stack([angle.cos(), angle.sin()], -1)


def val_log_prob(model, val):
    with torch.no_grad():
        return float(model.flow().log_prob(val).mean())


# Held-out data from elsewhere on the circle: the better the fit to the training data, the
# worse the held-out figure, so the best epoch comes early and patience runs out.
TRAIN, SHIFTED_VAL = circle_data(256), circle_data(128, 1, mean=-2.0)


def test_fit_reduces_the_loss_and_is_reproducible():
    data = circle_data(1024)
    histories, states = [], []
    for _ in range(2):
        atlas = A.circle(0, scale=0.1)
        histories.append(
            fit(
                atlas,
                data,
                epochs=8,
                batch_size=128,
                lr=1e-2,
                seed=3,
                val_data=circle_data(256, 1),
                progress=False,
            )
        )
        states.append(atlas.state_dict())
    h = histories[0]
    assert h["loss"][-1] < h["loss"][0] - 0.1
    assert h["val_log_prob"][-1] > h["val_log_prob"][0]
    assert histories[0] == histories[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fit_says_why_when_data_are_off_the_support():
    atlas = A.circle(0)
    with pytest.raises((FloatingPointError, ValueError), match="support"):
        fit(atlas, 2 * circle_data(64), epochs=1, progress=False)


def test_fit_accepts_a_dataloader_and_learns_chart_geometry_with_noise():
    """Learnable circle charts fitted with the thickened likelihood move onto the data."""
    torch.manual_seed(0)
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    atlas = AtlasFlow.spheres(
        1,
        torch.zeros(2, 2),
        torch.ones(2),
        poles,
        learnable=True,
        hidden=(8,),
        layers=1,
        noise_scale=0.05,
    )
    data = 1.5 * circle_data(1024) + torch.tensor([0.3, -0.2], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(data.float(), batch_size=128, shuffle=True)
    before = float(atlas.flow().distance_to_support(data.float()).mean())
    fit(atlas, loader, epochs=30, lr=2e-2, progress=False)
    after = float(atlas.flow().distance_to_support(data.float()).mean())
    assert after < 0.2 * before


BAD_ARGUMENTS = [
    ({"epochs": -1}, "epochs must be a positive int"),
    ({"epochs": 0}, "epochs must be a positive int"),
    ({"epochs": 1.5}, "epochs must be a positive int"),
    ({"epochs": True}, "epochs must be a positive int"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"batch_size": 2.5}, "batch_size must be a positive int"),
    ({"lr": 0.0}, "lr must be a positive finite"),
    ({"lr": -1e-3}, "lr must be a positive finite"),
    ({"lr": math.nan}, "lr must be a positive finite"),
    ({"lr": math.inf}, "lr must be a positive finite"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"val_data": torch.zeros(8, 3, dtype=torch.float64)}, r"val_data must have points"),
    ({"patience": 0, "val_data": SHIFTED_VAL}, "patience must be a positive int"),
    ({"patience": 3}, "patience needs val_data"),
    ({"monitor": "val_log_prob"}, "needs val_data"),
    ({"time_limit": -1.0}, "time_limit"),
    ({"time_limit": math.nan}, "time_limit"),
    ({"schedule": "linear"}, "schedule must be"),
    ({"mode": "up", "val_data": SHIFTED_VAL}, "mode must be"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_fit_rejects_bad_arguments_before_training(kwargs, message):
    atlas = A.circle(0, scale=0.1)
    before = {k: v.clone() for k, v in atlas.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fit(atlas, TRAIN, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in atlas.state_dict().items())


def test_fit_rejects_an_unknown_monitor_and_a_bad_scheduler_factory():
    with pytest.raises(ValueError, match=r"not a held-out figure.*val_log_prob"):
        fit(A.circle(0), TRAIN, val_data=SHIFTED_VAL, monitor="val_nll", epochs=1, progress=False)
    with pytest.raises(TypeError, match="scheduler"):
        fit(A.circle(0), TRAIN, schedule=lambda opt: 0.5, epochs=1, progress=False)


@pytest.mark.parametrize("restore_best", [True, False])
def test_early_stopping_restores_the_best_state(restore_best):
    atlas = A.circle(0, scale=0.1)
    h = fit(
        atlas,
        TRAIN,
        val_data=SHIFTED_VAL,
        epochs=40,
        batch_size=64,
        lr=2e-2,
        patience=3,
        restore_best=restore_best,
        seed=0,
        progress=False,
    )
    figures = h["val_log_prob"]
    assert isinstance(h, FitHistory) and h.stop_reason == "patience"
    assert h.best_epoch == max(range(len(figures)), key=figures.__getitem__)
    assert h.best == figures[h.best_epoch]
    # It stopped exactly `patience` epochs after the best one, before running out of epochs.
    assert len(h["loss"]) == h.best_epoch + 3 + 1 < 40
    expected = h.best if restore_best else figures[-1]
    assert val_log_prob(atlas, SHIFTED_VAL) == expected
    assert figures[-1] < h.best


def test_minimized_monitor_and_best_epoch_without_early_stopping():
    """mode defaults to 'min' for a figure not named log_prob; a loss_fn's own monitor."""

    class NLLWithMonitor:
        def __call__(self, model, batch):
            return -model.flow().log_prob(batch).mean()

        @torch.no_grad()
        def monitor(self, model, val):
            return {"val_nll": -float(model.flow().log_prob(val).mean())}

    atlas = A.circle(0, scale=0.1)
    h = fit(
        atlas,
        TRAIN,
        loss_fn=NLLWithMonitor(),
        val_data=SHIFTED_VAL,
        monitor="val_nll",
        epochs=6,
        lr=2e-2,
        seed=0,
        progress=False,
    )
    assert h.stop_reason == "epochs" and len(h["loss"]) == 6
    assert h.best == min(h["val_nll"]) and h["val_nll"][h.best_epoch] == h.best
    assert -val_log_prob(atlas, SHIFTED_VAL) == h.best


def test_cosine_schedule_and_a_scheduler_factory():
    h = fit(A.circle(0), TRAIN, epochs=5, lr=1e-2, schedule="cosine", seed=0, progress=False)
    expected = [1e-2 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert h["lr"] == pytest.approx(expected, rel=1e-12)
    h = fit(
        A.circle(0),
        TRAIN,
        epochs=5,
        lr=1e-2,
        schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.1),
        seed=0,
        progress=False,
    )
    assert h["lr"] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4], rel=1e-12)


def test_plateau_schedule_halves_the_rate_on_the_monitored_figure():
    """The recorded rates are those of ReduceLROnPlateau fed the held-out figures."""
    h = fit(
        A.circle(0, scale=0.1),
        TRAIN,
        val_data=SHIFTED_VAL,
        epochs=10,
        batch_size=64,
        lr=2e-2,
        schedule="plateau",
        patience=6,
        restore_best=False,
        seed=0,
        progress=False,
    )
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-2)
    replay = torch.optim.lr_scheduler.ReduceLROnPlateau(dummy, "max", factor=0.5, patience=2)
    rates = []
    for figure in h["val_log_prob"]:
        rates.append(dummy.param_groups[0]["lr"])
        replay.step(figure)
    assert h["lr"] == rates
    assert min(rates) < 2e-2  # the held-out figure stalls here, so the rate did fall


def test_time_limit_stops_after_the_running_epoch():
    h = fit(A.circle(0), TRAIN, epochs=50, time_limit=1e-9, seed=0, progress=False)
    assert len(h["loss"]) == 1 and h.stop_reason == "time_limit"


def test_resume_with_schedule_and_early_stopping_is_exact(tmp_path):
    """One epoch per call (a time budget that runs out at once), resumed until the end, gives
    the history, parameters and best state of an uninterrupted run."""
    kwargs = dict(
        val_data=SHIFTED_VAL,
        epochs=12,
        batch_size=64,
        lr=2e-2,
        patience=4,
        schedule="plateau",
        seed=5,
        progress=False,
    )
    whole = A.circle(0, scale=0.1)
    expected = fit(whole, TRAIN, checkpoint=tmp_path / "whole.pt", **kwargs)
    assert expected.stop_reason == "patience"
    path = tmp_path / "pieces.pt"
    calls = 0
    while True:
        pieces = A.circle(0, scale=0.1)
        h = fit(pieces, TRAIN, checkpoint=path, resume=True, time_limit=1e-9, **kwargs)
        calls += 1
        if h.stop_reason != "time_limit":
            break
    assert calls == len(expected["loss"])
    assert h == expected and h.best_epoch == expected.best_epoch and h.best == expected.best
    assert h.stop_reason == "patience"
    for key, value in whole.state_dict().items():
        assert torch.equal(pieces.state_dict()[key], value)
    # A run stopped by patience stays stopped when resumed.
    again = A.circle(0, scale=0.1)
    h = fit(again, TRAIN, checkpoint=path, resume=True, **kwargs)
    assert h == expected and h.stop_reason == "patience"
    assert all(torch.equal(again.state_dict()[k], v) for k, v in whole.state_dict().items())


def test_cosine_resume_is_exact(tmp_path):
    kwargs = dict(epochs=4, lr=1e-2, schedule="cosine", seed=1, progress=False)
    whole = A.circle(0, scale=0.1)
    expected = fit(whole, TRAIN, **kwargs)
    pieces = A.circle(0, scale=0.1)
    fit(pieces, TRAIN, checkpoint=tmp_path / "c.pt", time_limit=1e-9, **kwargs)
    h = fit(pieces, TRAIN, checkpoint=tmp_path / "c.pt", resume=True, **kwargs)
    assert h == expected
    assert all(torch.equal(pieces.state_dict()[k], v) for k, v in whole.state_dict().items())


def test_progress_writes_few_lines_when_not_a_terminal(capsys):
    fit(A.circle(0), TRAIN, epochs=4, seed=0, progress=True, log_every=1e9)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fit: epoch 4/4  loss ")
    fit(A.circle(0), TRAIN, epochs=4, seed=0, progress=True, log_every=0.0)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"fit: epoch {e}/4" for e in range(1, 5)]
    fit(A.circle(0), TRAIN, epochs=4, seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    fit(A.circle(0), TRAIN, epochs=3, seed=0, progress=True)
    out = terminal.getvalue()
    assert "fit:" in out and "3/3" in out and "\r" in out
    assert "fit: epoch" not in out


def test_docstring_example_runs():
    result = doctest.testmod(mle, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_fit_stops_on_a_non_finite_gradient_before_spoiling_the_parameters():
    def loss_fn(model, batch):
        p = next(model.parameters())
        shift = (p - p.detach()).sum()
        return shift.abs().sqrt() - model.flow().log_prob(batch).mean().detach()

    atlas = A.circle(0, scale=0.1)
    before = {k: v.clone() for k, v in atlas.state_dict().items()}
    with pytest.raises(FloatingPointError, match="gradient norm is nan at epoch 1"):
        fit(atlas, TRAIN, loss_fn=loss_fn, epochs=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in atlas.state_dict().items())

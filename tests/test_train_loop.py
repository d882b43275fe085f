"""The one training loop: planted answers with the maps' settings and the inverter's, stopping where a planted
validation curve says, resuming bit for bit, and delegating everything process-specific to its strategy."""
import pytest
import torch
from torch import nn

import featmap.core.io as io
import featmap.train.loop as loop
from featmap.core.distributed import Context
from featmap.train.loop import AdamW, Cosine, Pairs, Recipe, Stopping, TrainConfig, fit, map_recipe
from featmap.train.strategy import DataParallel, SingleProcess, Strategy, strategy_for

torch.set_num_threads(1)
C, SIDE = 6, 3


def planted_affine(seed: int, n: int):
    """Returns x (n, C, SIDE, SIDE), y = W x + b per position, and W (C, C), b (C,)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(C, C, generator=g) / C ** 0.5, torch.randn(C, generator=g) * 0.5
    x = torch.randn(n, C, SIDE, SIDE, generator=g)
    return x, torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1), w, b


def seeded(build, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def map_net() -> nn.Module:  # batch norm (buffers, single-sample batches) and dropout (seeded per epoch)
    return nn.Sequential(nn.Conv2d(C, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(16, C, 1))


def inverter_net() -> nn.Module:  # group norm, no dropout: the decoder's kind
    return nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, C, 1))


def inverter_recipe(epochs: int) -> Recipe:
    """The inverter's settings: cosine over a fixed budget, no early stopping, last weights, no dropout seeding."""
    return Recipe(loss=nn.functional.l1_loss, optimizer=AdamW(3e-3, 1e-4), schedule=Cosine(epochs),
                  stopping=Stopping(max_epochs=epochs), batch_size=8, seed=1, shuffle_stream="inverter-shuffle",
                  dropout_stream=None, metrics={"abs": lambda p, t: (p - t).abs().flatten(1).mean(1)})


def closed_form(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (W, b) of the least-squares affine map from x's to y's channel vectors (float64 lstsq)."""
    xp = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(x.numel() // C, 1)], 1).double()
    coef = torch.linalg.lstsq(xp, y.permute(0, 2, 3, 1).reshape(-1, C).double()).solution
    return coef[:-1].T.float(), coef[-1].float()


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_sgd_on_a_planted_affine_map_converges_to_the_closed_form(noise):
    """The maps' recipe (steps, plateau, early stopping) trains a 1x1 map to the least-squares W and b, with and
    without noise on the targets, and stops early, its kept weights no worse on validation than the closed form."""
    x, y, w, b = planted_affine(0, 400)
    y = y + noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    w_star, b_star = closed_form(x[:320], y[:320])
    net = seeded(lambda: nn.Conv2d(C, C, 1))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0, batch_size=32, max_steps=20000, eval_every=20, patience=400,
                      plateau_steps=100, min_delta=1e-4, min_lr=1e-7, mse_weight=1.0, cos_weight=0.0, seed=0)
    run = fit(net, map_recipe(cfg), Pairs(x[:320], y[:320]), Pairs(x[320:], y[320:]), progress=False)
    w_hat, b_hat = run.net.weight.detach()[:, :, 0, 0], run.net.bias.detach()
    # noiseless: the planted map itself; with noise, early stopping on validation photos keeps it near, not at, the
    # training set's least squares
    tol = 1e-3 if noise == 0 else 1e-2
    assert (w_hat - w_star).abs().max() < tol and (b_hat - b_star).abs().max() < tol, (w_hat - w_star).abs().max()
    if noise == 0:
        assert (w_star - w).abs().max() < 1e-5
    assert run.stopped_early and run.steps < cfg.max_steps and 0 < run.best_step < run.steps
    val_closed = nn.functional.mse_loss(torch.einsum("oc,bchw->bohw", w_star, x[320:]) + b_star.view(1, -1, 1, 1),
                                        y[320:])
    assert run.best_val_loss <= float(val_closed) * 1.001 + 1e-7


@pytest.mark.usefixtures("every_epoch_checkpoints")
def test_the_inverter_settings_run_exactly_the_budget_and_keep_the_last_weights(tmp_path):
    x, y, _, _ = planted_affine(1, 60)
    noise = torch.randn(20, C, SIDE, SIDE, generator=torch.Generator().manual_seed(9))
    ckpt = tmp_path / "run.partial.pt"
    run = fit(seeded(inverter_net), inverter_recipe(7), Pairs(x[:40], y[:40]), Pairs(x[40:], noise),
              checkpoint=ckpt, progress=False)  # validation targets are noise: it never improves much, and no matter
    assert run.epochs == len(run.history) == 7 and run.resumed_from == 0
    assert all(set(r) == {"step", "epoch", "lr", "train_loss", "val_loss", "val_abs"} for r in run.history)
    last = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, last["net"][k]) for k, v in run.net.state_dict().items())
    assert last["opt"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed to zero at the end
    without_val = fit(seeded(inverter_net), inverter_recipe(3), Pairs(x[:40], y[:40]), progress=False)
    assert [set(r) for r in without_val.history] == [{"step", "epoch", "lr", "train_loss"}] * 3


def test_autocast_runs_the_training_pass_in_bfloat16_and_keeps_float32_weights_and_validation():
    x, y, _, _ = planted_affine(2, 80)
    net = seeded(inverter_net)
    seen = []
    net[0].register_forward_hook(lambda module, inputs, out: seen.append((module.training, out.dtype)))
    recipe = Recipe(**{**inverter_recipe(20).__dict__, "autocast": torch.bfloat16})
    run = fit(net, recipe, Pairs(x[:64], y[:64]), Pairs(x[64:], y[64:]), progress=False)
    assert {d for training, d in seen if training} == {torch.bfloat16}  # the training forward
    assert {d for training, d in seen if not training} == {torch.float32}  # validation
    assert all(p.dtype == torch.float32 for p in run.net.parameters())
    plain = fit(seeded(inverter_net), inverter_recipe(20), Pairs(x[:64], y[:64]), Pairs(x[64:], y[64:]),
                progress=False)
    # it learns like the float32 run: the validation loss falls well below its start, to within 10% of float32's
    assert run.history[-1]["val_loss"] < 0.6 * run.history[0]["val_loss"], [r["val_loss"] for r in run.history]
    assert run.history[-1]["val_loss"] < 1.1 * plain.history[-1]["val_loss"], (run.history[-1], plain.history[-1])


def test_a_fit_runs_cudnns_deterministic_algorithms_and_restores_the_setting():
    """Seeded fits repeat on a GPU only with cuDNN's deterministic convolutions (tests/test_cuda.py on a device)."""
    x, y, _, _ = planted_affine(3, 40)
    net = seeded(inverter_net)
    seen = []
    net[0].register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.deterministic,
                                                         torch.backends.cudnn.benchmark)))
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        fit(net, inverter_recipe(2), Pairs(x[:32], y[:32]), Pairs(x[32:], y[32:]), progress=False)
        assert seen and set(seen) == {(True, False)}
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_early_stopping_stops_where_a_planted_validation_curve_stops_improving(monkeypatch):
    """Validation every 5 steps from step 0; improvements of more than 5% count; patience 15 steps."""
    x, y, _, _ = planted_affine(2, 80)
    curve = [1.0, 0.8, 0.7, 0.69, 0.75, 0.9, 0.1, 0.1]  # improvements over 5% end at the third reading (step 10)
    seen = []

    def planted(net, data, loss, metrics, batch_size, device):
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return {"loss": curve[len(seen) - 1]}

    monkeypatch.setattr(loop, "_evaluate", planted)
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=100, eval_every=5, patience=15, plateau_steps=100,
                      min_delta=0.05)
    run = fit(seeded(map_net), map_recipe(cfg), Pairs(x[:60], y[:60]), Pairs(x[60:], y[60:]), progress=False)
    assert run.steps == 25 and run.best_step == 10 and run.best_val_loss == 0.7 and run.stopped_early
    assert [r["val_loss"] for r in run.history] == curve[:6] and [r["step"] for r in run.history] == [0, 5, 10, 15,
                                                                                                          20, 25]
    assert all(torch.equal(v, seen[2][k]) for k, v in run.net.state_dict().items())  # the best round's weights


def test_a_run_that_reaches_its_cap_did_not_stop_early():
    x, y, _, _ = planted_affine(2, 80)
    cfg = TrainConfig(lr=1e-3, batch_size=16, max_steps=30, eval_every=10, patience=1000, plateau_steps=1000)
    run = fit(seeded(map_net), map_recipe(cfg), Pairs(x[:60], y[:60]), Pairs(x[60:], y[60:]), progress=False)
    assert run.steps == 30 and not run.stopped_early and [r["step"] for r in run.history] == [0, 10, 20, 30]
    epochs = fit(seeded(map_net), map_recipe(TrainConfig(lr=1e-3, batch_size=16, max_steps=1000, eval_every=10,
                                                         patience=1000, plateau_steps=1000, max_epochs=2)),
                 Pairs(x[:60], y[:60]), Pairs(x[60:], y[60:]), progress=False)
    assert epochs.epochs == 2 and epochs.steps == 8 and not epochs.stopped_early  # 60 pairs: 4 batches of 16 a pass


@pytest.mark.parametrize("bad", [{"max_steps": -1}, {"patience": 0}, {"eval_every": 0}, {"patience": 5},
                                 {"plateau_steps": 3}, {"lr": 0.0}, {"max_epochs": 0}, {"min_delta": 0.9}])
def test_out_of_range_training_settings_name_the_setting(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**{"eval_every": 10, "patience": 100, "plateau_steps": 50, **bad})


@pytest.mark.usefixtures("every_epoch_checkpoints")
@pytest.mark.parametrize("settings", ["map", "inverter"])
def test_an_interrupted_run_resumes_to_the_very_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, settings):
    x, y, _, _ = planted_affine(3, 90)
    train, val = Pairs(x[:65], y[:65]), Pairs(x[65:], y[65:])  # 65 = 4 x 16 + 1: a single-sample batch skipped
    if settings == "map":
        build, recipe = map_net, map_recipe(TrainConfig(lr=3e-3, batch_size=16, max_steps=24, eval_every=4, patience=24,
                                                        plateau_steps=8, seed=4))
    else:
        build, recipe = inverter_net, inverter_recipe(6)
    whole = fit(seeded(build), recipe, train, val, checkpoint=tmp_path / "whole.pt", progress=False)

    real, writes = io.atomic_write, []

    def killed_at_the_fourth_write(path, write):
        writes.append(path)
        if len(writes) == 4:
            raise KeyboardInterrupt  # three epochs were checkpointed
        real(path, write)

    monkeypatch.setattr(io, "atomic_write", killed_at_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        fit(seeded(build), recipe, train, val, checkpoint=tmp_path / "cut.pt", progress=False)
    monkeypatch.setattr(io, "atomic_write", real)
    torch.manual_seed(12345)  # whatever the global generator holds, the resumed run draws what the whole one drew
    resumed = fit(seeded(build), recipe, train, val, checkpoint=tmp_path / "cut.pt", progress=False)
    # three rounds checkpointed: 3 x 4 steps (the map: 4 full batches a pass, the single sample skipped), or three
    # epochs of 9 steps (the inverter: 8 batches and the single sample)
    assert resumed.resumed_from == (12 if settings == "map" else 27) and resumed.steps == whole.steps
    assert resumed.epochs == whole.epochs
    assert resumed.history == whole.history
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


@pytest.mark.usefixtures("every_epoch_checkpoints")
def test_a_torn_checkpoint_is_discarded_and_the_run_starts_over(tmp_path):
    x, y, _, _ = planted_affine(4, 40)
    ckpt = tmp_path / "torn.partial.pt"
    ckpt.write_bytes(b"PK\x03\x04 half a checkpoint")
    run = fit(seeded(inverter_net), inverter_recipe(2), Pairs(x, y), checkpoint=ckpt, progress=False)
    assert run.resumed_from == 0 and run.epochs == 2 and ckpt.is_file()


class Recording(Strategy):
    """A strategy that records every call, takes every other sample of a batch and makes every validation loss
    worse than the last (whatever the network's), so that what the loop does can only come from it."""

    world_size = 2
    writes = False

    def __init__(self):
        self.calls, self.agreed = [], 0

    def check(self, n_train):
        self.calls.append(("check", n_train))

    def prepare(self, net, device):
        self.calls.append(("prepare",))
        return net

    def wrap(self, net, device):
        self.calls.append(("wrap",))
        return net

    def dropout_key(self):
        self.calls.append(("dropout_key",))
        return ("fake rank",)

    def share(self, idx):
        self.calls.append(("share", len(idx)))
        return idx[::2]

    def weight(self, loss, mine, batch):
        self.calls.append(("weight", len(mine), len(batch)))
        return loss

    def end_round(self, net):
        self.calls.append(("end_round",))

    def agree(self, value):
        self.calls.append(("agree",))
        self.agreed += 1
        return {**value, "loss": float(self.agreed)}

    def from_main(self, read):
        self.calls.append(("from_main",))
        return None  # the main process found nothing to resume: start fresh


def test_the_loop_delegates_everything_process_specific_to_its_strategy(tmp_path):
    x, y, _, _ = planted_affine(5, 50)
    strategy = Recording()
    cfg = TrainConfig(lr=1e-3, batch_size=16, max_steps=30, eval_every=3, patience=6, plateau_steps=100)
    ckpt = tmp_path / "never.partial.pt"
    run = fit(seeded(map_net), map_recipe(cfg), Pairs(x[:40], y[:40]), Pairs(x[40:], y[40:]), strategy=strategy,
              checkpoint=ckpt, progress=False)
    assert strategy.calls[:5] == [("check", 40), ("prepare",), ("from_main",), ("wrap",), ("agree",)]  # step 0
    # a round of 3 steps: two full batches and the pass's remainder of 8, then one step of the next pass
    one = [("dropout_key",), ("share", 16), ("weight", 8, 16), ("share", 16), ("weight", 8, 16),
           ("share", 8), ("weight", 4, 8), ("end_round",), ("agree",)]
    two = [("dropout_key",), ("share", 16), ("weight", 8, 16), ("share", 16), ("weight", 8, 16),
           ("share", 8), ("weight", 4, 8), ("end_round",), ("agree",)]
    assert strategy.calls[5:] == one + two  # the agreed losses 1, 2, 3 never improve after step 0: stop at step 6
    assert run.steps == 6 and [r["val_loss"] for r in run.history] == [1.0, 2.0, 3.0] and run.best_step == 0
    assert not ckpt.exists()  # this process does not write


def test_the_two_strategies():
    assert isinstance(strategy_for(None), SingleProcess) and isinstance(strategy_for(Context()), SingleProcess)
    one, idx, loss = SingleProcess(), torch.arange(7), torch.tensor(2.0)
    assert one.writes and one.share(idx) is idx and one.weight(loss, idx, idx) is loss and one.agree(3) == 3
    second = strategy_for(Context(rank=1, world_size=2, backend="gloo"))
    assert isinstance(second, DataParallel) and not second.writes and second.dropout_key() == (1,)
    assert second.share(idx).tolist() == [1, 3, 5]
    assert second.weight(loss, second.share(idx), idx).item() == pytest.approx(2.0 * 3 * 2 / 7)
    with pytest.raises(ValueError, match="1 training pairs cannot be shared by 2 processes"):
        second.check(1)


def test_steering_settings_without_validation_are_refused():
    x, y, _, _ = planted_affine(6, 10)
    with pytest.raises(ValueError, match="needs a validation loss"):
        fit(nn.Conv2d(C, C, 1), map_recipe(TrainConfig()), Pairs(x, y), progress=False)


def test_checkpoints_are_written_when_their_interval_has_passed(tmp_path, monkeypatch):
    """After every epoch with an interval of 0; never within a run shorter than the interval; the default interval is
    CHECKPOINT_SECONDS at the call. The results do not depend on it."""
    x, y, _, _ = planted_affine(4, 40)
    real, writes = io.atomic_write, []

    def counted(path, write):
        writes.append(path)
        real(path, write)

    monkeypatch.setattr(io, "atomic_write", counted)
    runs = {}
    for name, every in (("each", 0.0), ("never", 1e9), ("default", None)):
        if name == "default":
            monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)
        writes.clear()
        runs[name] = fit(seeded(inverter_net), inverter_recipe(3), Pairs(x, y), checkpoint=tmp_path / f"{name}.pt",
                         progress=False, checkpoint_every=every)
        assert len(writes) == (0 if name == "never" else 3), (name, writes)
    for k, v in runs["each"].net.state_dict().items():
        assert torch.equal(v, runs["never"].net.state_dict()[k]), k


@pytest.mark.parametrize("every", [-1.0, float("nan")])
def test_a_negative_or_undefined_checkpoint_interval_is_refused(tmp_path, every):
    x, y, _, _ = planted_affine(4, 40)
    with pytest.raises(ValueError, match="checkpoint_every must be seconds >= 0"):
        fit(seeded(inverter_net), inverter_recipe(1), Pairs(x, y), checkpoint=tmp_path / "c.pt", progress=False,
            checkpoint_every=every)


@pytest.mark.parametrize("eval_every, plateau_steps, halved_at", [(10, 50, 50), (20, 50, 60), (20, 60, 60), (5, 5, 5)])
def test_the_rate_is_halved_no_sooner_than_plateau_steps_after_the_last_improvement(monkeypatch, eval_every,
                                                                                   plateau_steps, halved_at):
    """A validation loss that never improves after step 0: the learning rate halves at the first reading at least
    plateau_steps steps later, never earlier (reading every 20 steps, 50 means 60)."""
    x, y, _, _ = planted_affine(7, 80)
    monkeypatch.setattr(loop, "_evaluate", lambda *args: {"loss": 1.0})
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=100, eval_every=eval_every, patience=100,
                      plateau_steps=plateau_steps)
    run = fit(seeded(map_net), map_recipe(cfg), Pairs(x[:60], y[:60]), Pairs(x[60:], y[60:]), progress=False)
    first_lower = next(r["step"] for r in run.history if r["lr"] < 1e-2)
    assert first_lower == halved_at + eval_every  # a record's lr is the one its round trained with

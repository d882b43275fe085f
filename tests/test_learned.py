"""Planted answers for every map of the zoo, and the training loop's guarantees."""
import copy

import pytest
import torch

import featmap.maps.learned as learned
import featmap.train.loop as training
from featmap.maps.base import MAP_SIZES, MapOptions, get_mapping
from featmap.maps.stats import LinearStats, PositionStats
from featmap.score.metrics import cos_mean
from featmap.train.loop import TrainConfig, train_map
from featmap.train.normalizer import NormalizedMap, Normalizer


class Pairs:
    """A FitData over in-memory tensors (train / val / test split by sample)."""

    def __init__(self, x, y, key="planted", n_val=None):
        n = len(x)
        n_val = n_val or n // 5
        self.parts = {"train": (x[: n - 2 * n_val], y[: n - 2 * n_val]), "val": (x[n - 2 * n_val: n - n_val],
                      y[n - 2 * n_val: n - n_val]), "test": (x[n - n_val:], y[n - n_val:])}
        self.key = key

    def tensors(self, part):
        return self.parts[part]

    def stats(self, part):
        x, y = self.parts[part]
        return LinearStats(x.shape[1], y.shape[1]).update(x, y)

    def position_stats(self, part):
        x, y = self.parts[part]
        return PositionStats(x.shape[1], y.shape[1], x.shape[2] * x.shape[3]).update(x, y)


def shared_affine(seed, n=640, c=8, side=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g) / c ** 0.5
    b = torch.randn(c, generator=g) * 0.5
    x = torch.randn(n, c, side, side, generator=g)
    return x, torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1), w, b


def options(tmp_path, start="identity", **train):
    """Tiny maps trained for at most 360 steps (no early stop, no plateau before the cap); ``start`` identity so that
    a planted map is learned by the network itself, not handed over by the closed-form linear start."""
    cfg = {"lr": 1e-2, "batch_size": 64, "max_steps": 360, "eval_every": 10, "patience": 360, "plateau_steps": 360,
           "seed": 0, **train}
    return MapOptions(size="tiny", cache_dir=str(tmp_path), progress=False, start=start, train=TrainConfig(**cfg))


@pytest.mark.parametrize("seed", [0, 1])
def test_procrustes_recovers_a_planted_orthogonal_map(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    shift = torch.randn(16, generator=g, dtype=torch.float64)
    x = torch.randn(50, 16, 3, 3, generator=g, dtype=torch.float64)
    y = torch.einsum("oc,bchw->bohw", q, x) + shift.view(1, -1, 1, 1)
    m = get_mapping("procrustes").fit(Pairs(x, y))
    assert torch.allclose(m.weight.double(), q, atol=1e-5)
    assert torch.allclose(m.bias.double(), shift, atol=1e-5)
    assert torch.allclose(m.weight @ m.weight.T, torch.eye(16), atol=1e-5)


def test_local_linear_recovers_a_different_map_at_every_position():
    g = torch.Generator().manual_seed(0)
    c, side, n = 6, 3, 60
    w = torch.randn(side * side, c, c, generator=g, dtype=torch.float64)
    b = torch.randn(side * side, c, generator=g, dtype=torch.float64)
    x = torch.randn(n, c, side, side, generator=g, dtype=torch.float64)
    y = (torch.einsum("poc,bcp->bop", w, x.flatten(2)) + b.T[None]).reshape(n, c, side, side)
    m = get_mapping("local_linear", MapOptions(ridge=0.0)).fit(Pairs(x, y))
    assert torch.allclose(m.weight.double(), w, atol=1e-5) and torch.allclose(m.bias.double(), b, atol=1e-5)
    assert torch.allclose(m.predict(x.float()).double(), y, atol=1e-4)
    shared = get_mapping("linear", MapOptions(ridge=0.0)).fit(Pairs(x, y))
    assert cos_mean(shared.predict(x.float()), y.float()).mean() < 0.9  # one shared map cannot do this


@pytest.mark.parametrize("name", ["linear_sgd", "mlp", "transformer"])
def test_trained_maps_fit_a_planted_shared_affine_map(tmp_path, name):
    x, y, _, _ = shared_affine(0)
    data = Pairs(x, y)
    m = get_mapping(name, options(tmp_path)).fit(data)
    xt, yt = data.tensors("test")
    identity = cos_mean(xt, yt).mean()
    fitted = cos_mean(m.predict(xt), yt).mean()
    assert fitted > 0.97 and fitted > identity + 0.2, (name, float(fitted), float(identity))


def test_positional_embeddings_let_a_transformer_learn_a_fixed_permutation(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, 3, 3, generator=g)
    y = torch.rot90(x, 1, dims=(2, 3))  # content moves; nothing in a token says where to
    data = Pairs(x, y)
    xt, yt = data.tensors("test")
    opts = options(tmp_path)
    with_pe = cos_mean(get_mapping("transformer_pe", opts).fit(data).predict(xt), yt).mean()
    without = cos_mean(get_mapping("transformer", opts).fit(data).predict(xt), yt).mean()
    assert with_pe > 0.95, float(with_pe)
    assert without < 0.5, float(without)


def planted_nonlinear(seed, n=400, c=6, side=4):
    """Returns x and y = relu(W x + b) + a neighbour's channel 0: affine to first order, with a non-linear and a
    spatial part no shared linear map can reach."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g) / c ** 0.5
    x = torch.randn(n, c, side, side, generator=g) * torch.linspace(0.5, 3, c).view(1, c, 1, 1) + 1.0
    y = torch.relu(torch.einsum("oc,bchw->bohw", w, x) + 0.3) + 0.5 * torch.roll(x[:, :1], 1, dims=3)
    return x, y


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "transformer_pe"])
def test_a_linear_start_predicts_the_closed_form_linear_map_before_the_first_step(tmp_path, name):
    x, y = planted_nonlinear(0)
    data = Pairs(x, y)
    m = get_mapping(name, options(tmp_path, start="linear", max_steps=0)).fit(data)
    linear = get_mapping("linear").fit(data)
    xt = data.tensors("test")[0]
    np_close = torch.testing.assert_close
    np_close(m.predict(xt), linear.predict(xt), atol=2e-5, rtol=1e-5)
    facts = m.extra_metrics()
    assert facts["steps"] == 0 and facts["best_step"] == 0 and facts["stopped_early"] == 0
    from featmap.maps.learned import objective
    assert facts["train_loss"] == pytest.approx(objective(linear, data, m.options.train)["train_loss"], rel=1e-5)


def test_a_linear_start_learns_what_the_linear_map_cannot_and_keeps_it_only_if_validation_agrees(tmp_path):
    x, y = planted_nonlinear(1, n=1000)
    data = Pairs(x, y)
    xt, yt = data.tensors("test")
    linear = cos_mean(get_mapping("linear").fit(data).predict(xt), yt).mean()
    cnn = get_mapping("cnn", options(tmp_path, start="linear", lr=3e-3, patience=100, plateau_steps=50)).fit(data)
    assert cnn.extra_metrics()["best_step"] > 0
    assert cos_mean(cnn.predict(xt), yt).mean() > linear + 0.02, (float(linear), cnn.extra_metrics())
    # targets of pure noise: nothing generalises, so the kept weights are the start's (step 0)
    noise = Pairs(x, torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    lucky = get_mapping("transformer", options(tmp_path, start="linear", patience=60, plateau_steps=30)).fit(noise)
    assert lucky.extra_metrics()["best_step"] == 0 and lucky.extra_metrics()["stopped_early"] == 1
    torch.testing.assert_close(lucky.predict(xt), get_mapping("linear").fit(noise).predict(xt), atol=2e-5, rtol=1e-5)


def test_linear_sgd_starts_at_the_identity_with_the_closed_forms_prior(tmp_path):
    x, y = planted_nonlinear(2, n=300)
    data = Pairs(x, y)
    net = learned.build_net("linear_sgd", 6, 16, MAP_SIZES["tiny"], start="linear")
    assert torch.equal(net.weight[:, :, 0, 0], torch.eye(6)) and not net.bias.any()
    penalty = learned.identity_prior(alpha=2.0, channels=6, mse_weight=0.3)
    with torch.no_grad():
        net.weight.add_(0.5)
        assert penalty(net).item() == pytest.approx(0.3 * 2.0 / 6 * 36 * 0.25)
    sgd = get_mapping("linear_sgd", options(tmp_path, start="linear", lr=3e-3, max_steps=5000, patience=300,
                                            plateau_steps=100)).fit(data)
    closed = get_mapping("linear").fit(data)
    from featmap.maps.learned import objective
    ref = objective(closed, data, sgd.options.train)
    facts = sgd.extra_metrics()
    assert facts["stopped_early"] == 1 and facts["best_val_loss"] <= ref["best_val_loss"] * 1.02, (facts, ref)
    scratch = learned.build_net("linear_sgd", 6, 16, MAP_SIZES["tiny"], start="scratch")
    assert not torch.equal(scratch.weight[:, :, 0, 0], torch.eye(6))  # the reference's random initialisation


def test_normalisation_round_trips():
    x = torch.randn(10, 5, 3, 3) * torch.arange(1.0, 6.0).view(1, 5, 1, 1) + 7
    norm = Normalizer.fit(x)
    z = norm(x)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(z.transpose(0, 1).flatten(1).std(1), torch.ones(5), atol=1e-4)
    assert torch.allclose(norm.inverse(z), x, atol=1e-5)
    assert torch.allclose(NormalizedMap(torch.nn.Identity(), norm)(x), x, atol=1e-5)


def test_the_loss_cosine_is_torchs_cosine_in_value_and_gradient():
    a = torch.randn(5, 7, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, 3, 3, dtype=torch.float64)
    b[0, :, 0, 0] = 0  # a zero vector: cosine 0, as torch's
    ours, theirs = training.channel_cosine(a, b), torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)
    assert ours.shape == (5, 3, 3) and ours[0, 0, 0] == 0
    assert torch.allclose(ours, theirs, atol=1e-12)
    grad_ours, = torch.autograd.grad(ours.sum(), a)
    grad_theirs, = torch.autograd.grad(theirs.sum(), a)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-10)


def test_reference_loss_is_zero_for_a_perfect_prediction_and_grows_with_error():
    y = torch.randn(4, 6, 3, 3)
    assert training.reference_loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert training.reference_loss(y + 0.1, y) < training.reference_loss(y + 1.0, y) < training.reference_loss(-y, y)


def test_attention_dropout_is_its_own_setting_and_follows_dropout_when_unset():
    x = torch.randn(2, 6, 4, 4)
    # unset: torch's layer, dropout on the attention weights too (the reference's); small: none there
    assert learned.TokenTransformer(6, 16, 8, 1, 2, 16, 0.2, False).encoder.layers[0].self_attn.dropout == 0.2
    small = learned.build_net("transformer", 6, 16, MAP_SIZES["small"], start="scratch")
    assert all(layer.self_attn.dropout == 0.0 for layer in small.encoder.layers)
    assert all(layer.self_attn.dropout == 0.2 for layer in
               learned.build_net("transformer", 6, 16, MAP_SIZES["reference"], start="scratch").encoder.layers)
    # wired into the forward pass: with every other dropout off, training mode is random only through attention
    for attention, random in ((0.0, False), (0.5, True)):
        torch.manual_seed(0)
        net = learned.TokenTransformer(6, 16, 8, 1, 2, 16, 0.0, False, attention_dropout=attention).train()
        assert torch.equal(net(x), net(x)) is not random, attention


def _train(seed, tmp_path=None, max_steps=25):
    x, y, _, _ = shared_affine(1, n=200)
    torch.manual_seed(seed)
    net = learned.build_net("mlp", 8, 16, {"hidden": 16, "dropout": 0.2}, start="identity")
    cfg = TrainConfig(lr=1e-3, batch_size=32, max_steps=max_steps, eval_every=5, patience=100, plateau_steps=100,
                      seed=seed)
    ckpt = tmp_path / "ckpt.pt" if tmp_path else None
    return train_map(net, (x[:150], y[:150]), (x[150:], y[150:]), cfg, torch.device("cpu"), ckpt, progress=False)


def test_training_is_deterministic_for_a_seed():
    (a, ha), (b, hb), (c, _) = _train(0), _train(0), _train(1)
    assert ha["history"] == hb["history"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.usefixtures("every_epoch_checkpoints")
def test_an_interrupted_training_resumes_to_the_same_result(tmp_path, monkeypatch):
    reference, ref_history = _train(0, max_steps=30)
    calls = {"n": 0}
    real = training._evaluate

    def dies_at_the_fourth_validation(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "_evaluate", dies_at_the_fourth_validation)
    with pytest.raises(KeyboardInterrupt):
        _train(0, tmp_path, max_steps=30)
    monkeypatch.setattr(training, "_evaluate", real)
    resumed, history = _train(0, tmp_path, max_steps=30)
    assert history["history"] == ref_history["history"]
    for va, vb in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6)


def test_a_trained_map_is_cached_and_reused(tmp_path, monkeypatch):
    x, y, _, _ = shared_affine(2, n=200)
    data = Pairs(x, y)
    first = get_mapping("mlp", options(tmp_path, max_steps=20)).fit(data)
    assert len(list((tmp_path / "maps").glob("*.pt"))) == 1

    def no_training(*a, **k):
        raise AssertionError("a cached map was trained again")

    monkeypatch.setattr(learned, "train_map", no_training)
    again = get_mapping("mlp", options(tmp_path, max_steps=20)).fit(data)
    xt = data.tensors("test")[0]
    assert torch.equal(first.predict(xt), again.predict(xt))
    assert again.fit_seconds() == first.fit_seconds() > 0
    other = Pairs(x, y, key="other data")  # other training pairs: another map
    monkeypatch.undo()
    get_mapping("mlp", options(tmp_path, max_steps=20)).fit(other)
    assert len(list((tmp_path / "maps").glob("*.pt"))) == 2


def test_learned_map_metadata():
    from featmap.maps.base import MAPPINGS

    per_position = {n: MAPPINGS.get(n).per_position for n in MAPPINGS.names()}
    assert per_position == {"additive": True, "cnn": False, "identity": True, "linear": True, "linear_sgd": True,
                            "local_linear": True, "mlp": True, "procrustes": True, "transformer": False,
                            "transformer_pe": False}
    assert {n for n in MAPPINGS.names() if MAPPINGS.get(n).learned} == {"linear_sgd", "mlp", "cnn", "transformer",
                                                                          "transformer_pe"}


def test_cnn_fits_a_planted_local_convolution(tmp_path):
    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(8, 8, 3, 3, generator=g) / 8
    x = torch.randn(1000, 8, 5, 5, generator=g)
    y = torch.nn.functional.conv2d(x, kernel, padding=1)  # each output mixes a 3x3 neighbourhood
    data = Pairs(x, y)
    xt, yt = data.tensors("test")
    cnn = cos_mean(get_mapping("cnn", options(tmp_path)).fit(data).predict(xt), yt).mean()
    shared = cos_mean(get_mapping("linear", MapOptions(ridge=0.0)).fit(data).predict(xt), yt).mean()
    assert cnn > 0.95 and cnn > shared + 0.1, (float(cnn), float(shared))


def test_dropout_keeps_one_minus_p_scaled_and_is_seeded():
    drop = learned.Dropout(0.2).train()
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    p = 13107 / 65536  # 0.2 rounded to the 16-bit draws
    assert abs(kept.double().mean().item() - (1 - p)) < 0.003  # 400,000 draws: sd 0.0006
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # kept and scaled: the mean is kept
    assert abs(y.double().mean().item() - 1) < 0.004
    assert kept[:, :500].double().mean().item() > 0.78 and kept[:, 500:].double().mean().item() > 0.78
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the training loop seeds torch's generator every epoch
    assert not torch.equal(drop(x), y)
    # gradients flow through the kept elements only, with the same scale
    leaf = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(1)
    drop(leaf).sum().backward()
    torch.manual_seed(1)
    assert torch.equal(leaf.grad, (drop(torch.ones(64, 32)) != 0).float() / (1 - p))
    assert torch.equal(drop.eval()(x), x) and torch.equal(learned.Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout p must be in"):
        learned.Dropout(1.0)


def test_the_learned_maps_use_the_cheaper_dropout():
    size = {"hidden": 16, "layers": 1, "heads": 2, "ffn": 32, "dropout": 0.2, "attention_dropout": 0.0}
    for name in ("mlp", "transformer", "transformer_pe"):
        net = learned.build_net(name, 8, 16, size, start="identity")
        kinds = {type(m) for m in net.modules()}
        assert learned.Dropout in kinds and torch.nn.Dropout not in kinds, name


@pytest.mark.parametrize("attention_dropout", [0.0, 0.2])
def test_the_encoder_layer_computes_torchs_layer(attention_dropout):
    torch.manual_seed(0)
    ours = learned.TokenTransformer(6, 16, 8, 2, 2, 16, 0.2, False, attention_dropout=attention_dropout)
    theirs = copy.deepcopy(ours)
    for layer in theirs.encoder.layers:
        layer.__class__ = torch.nn.TransformerEncoderLayer  # torch's own self-attention block, same parameters
    x = torch.randn(4, 6, 4, 4)
    outputs = []
    for net in (ours, theirs):
        torch.manual_seed(1)  # the same dropout masks
        outputs.append(net.train()(x))
        outputs[-1].square().sum().backward()
    assert torch.allclose(*outputs, atol=1e-6)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-6)
    assert all(type(layer) is learned.EncoderLayer for layer in ours.encoder.layers)

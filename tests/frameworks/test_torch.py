"""PyTorch on the wafer (compiler/frontend/torch_import.py): the imported function equals torch's forward and
gradients; compiled on a mini wafer, both execution paths equal torch; trained with compile_train, every step's
loss equals training in torch with the same update rule; params go back with to_torch.

Tolerances: float32 forward 1e-5 relative to the output's scale (summation order differs), gradients 1e-4 relative
to the gradient's scale (they pass through more reassociated sums), losses of a 20-step training run 1e-4 relative.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import compiler
import wafer
from compiler.frontend.torch_import import ATEN, UnsupportedTorchOpError

SPEC = wafer.WaferSpec.mini(16, 16)


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)
    ), (8, 12)


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 2 * 2, 10),
    ), (4, 3, 8, 8)


class Encoder(torch.nn.Module):
    """A transformer block: torch's TransformerEncoderLayer, then a linear head."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(x))


def encoder():
    return Encoder(), (2, 6, 16)


MODELS = {"mlp": mlp, "cnn": cnn, "encoder": encoder}


def build(name, seed=0):
    torch.manual_seed(seed)
    module, shape = MODELS[name]()
    with torch.no_grad():  # running statistics away from (0, 1), so eval-mode BatchNorm is really tested
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return module.eval(), x


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(MODELS), ids=str)
def test_forward_and_gradients_equal_torch(name):
    module, x = build(name)
    fn, params = compiler.from_torch(module)
    xj = jnp.asarray(x.numpy())
    out = jax.jit(fn)(params, xj)
    assert rel(out, module(x).detach().numpy()) < 1e-5
    # gradients of a loss that is not invariant to the output's scale (layer norm): a random projection
    proj = torch.randn(*module(x).shape, generator=torch.Generator().manual_seed(7))
    xt = x.clone().requires_grad_(True)
    module.zero_grad()
    (module(xt) * proj).sum().backward()
    gp, gx = jax.grad(lambda p, xi: jnp.sum(fn(p, xi) * jnp.asarray(proj.numpy())), argnums=(0, 1))(params, xj)
    assert rel(gx, xt.grad.numpy()) < 1e-4
    back = compiler.to_torch(copy.deepcopy(module), gp)  # gradients in torch's layout, through to_torch's transposes
    for n, p in module.named_parameters():
        assert rel(dict(back.named_parameters())[n].detach().numpy(), p.grad.numpy()) < 1e-4, n


@pytest.mark.parametrize("name", list(MODELS), ids=str)
def test_compiled_both_paths_equal_torch(name):
    module, x = build(name)
    ref = module(x).detach().numpy()
    xj = jnp.asarray(x.numpy())
    exe = compiler.compile(module, xj, spec=SPEC)
    state = exe.load()
    for path in ("fast", "per_core"):
        out, state = exe(state, xj, path=path)
        assert rel(out, ref) < 1e-5, path
    assert exe.report.active_cores > 0
    if name != "encoder":  # Linear and Conv weights are stored in the tiled layouts: their kernels run per core
        assert any(p.traffic.phases for p in exe.plans.values())


def test_train_mode_batch_norm_updates_running_statistics():
    module, x = build("cnn")
    module.train()
    fn, params = compiler.from_torch(module)
    out, new = jax.jit(fn)(params, jnp.asarray(x.numpy()))
    ref = module(x).detach().numpy()  # updates module's buffers: the reference for new["state"]
    assert rel(out, ref) < 1e-5
    for n, b in module.named_buffers():
        if b.is_floating_point():
            assert rel(new["state"][n], b.numpy()) < 1e-6, n
    assert set(new["params"]) == set(params["params"])


def test_dropout_in_train_mode_needs_a_key_and_has_torchs_distribution():
    module = torch.nn.Sequential(torch.nn.Dropout(0.25)).train()
    fn, params = compiler.from_torch(module)
    x = jnp.ones((200, 100))
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        fn(params, x)
    out, _ = fn(params, x, rng=jax.random.key(0))
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.75, rtol=1e-6)
    out2, _ = fn(params, x, rng=jax.random.key(1))
    assert not np.array_equal(np.asarray(out), np.asarray(out2))
    eval_fn, _ = compiler.from_torch(module.eval())
    np.testing.assert_array_equal(np.asarray(eval_fn(params, x)), np.asarray(x))


def test_exact_gelu_and_a_torch_written_loss():
    """torch's exact GELU is erf-based (not the tanh approximation), and a loss written in torch imports too."""
    x = jnp.linspace(-4, 4, 101)
    fn, params = compiler.from_torch(torch.nn.GELU().eval())
    ref = torch.nn.functional.gelu(torch.tensor(np.asarray(x))).numpy()
    assert rel(fn(params, x), ref) < 1e-6
    loss_fn, lp = compiler.from_torch(torch.nn.CrossEntropyLoss(), train=False)  # (new modules are in train mode)
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    y = jnp.array([0, 3, 1, 2, 2, 0])
    want = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(y, np.int64)))
    assert rel(loss_fn(lp, logits, y), want.numpy()) < 1e-6


def test_round_trip_and_errors():
    module, x = build("cnn")
    fn, params = compiler.from_torch(module)
    other, _ = build("cnn", seed=3)
    compiler.to_torch(other, params)
    np.testing.assert_allclose(other(x).detach().numpy(), module(x).detach().numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="not a parameter or buffer"):
        compiler.to_torch(other, {"params": {"nope.weight": np.zeros(3)}, "state": {}})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compiler.from_torch(lambda x: x)
    bn = torch.nn.BatchNorm1d(4, momentum=None).train()
    with pytest.raises(ValueError, match="momentum=None"):
        compiler.from_torch(bn)

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    f, p = compiler.from_torch(Odd())
    with pytest.raises(UnsupportedTorchOpError, match="bessel_j0"):
        f(p, jnp.ones(3))
    assert "aten.addmm" in ATEN


OPTIMIZERS = {
    # optax and torch.optim with the same update rule
    "sgd_momentum": (lambda: optax.sgd(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    # eps 1e-3: attention's key bias has a zero gradient in exact arithmetic (softmax ignores a constant per row),
    # and Adam with a tiny eps scales float noise of either implementation up to full-size steps
    "adam": (lambda: optax.adam(1e-2, eps=1e-3), lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-3)),
}


@pytest.mark.parametrize(
    "name, optimizer",
    [("cnn", "sgd_momentum"), ("encoder", "adam")],
    ids=["cnn-batchnorm-sgd_momentum", "transformer-adam"],
)
def test_training_matches_torch_step_by_step(name, optimizer):
    """20 steps on the wafer (BatchNorm in train mode, its statistics updated on the wafer) against torch autograd
    with torch.optim's same rule: every step's loss within 1e-4, then the params and running statistics."""
    module, x = build(name)
    out_shape = module(x).shape  # in eval mode: leaves the running statistics alone
    n_out = out_shape[-1]
    module.train()
    reference = copy.deepcopy(module)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, *x.shape)).astype(np.float32)
    ys = rng.integers(0, n_out, size=(20, *out_shape[:-1]))
    fn, params = compiler.from_torch(module)

    def loss(params, batch):
        logits, new = fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new

    make_optax, make_torch = OPTIMIZERS[optimizer]
    loss_fn, opt = compiler.stateful(loss, make_optax())
    batch0 = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0], jnp.int32)}
    tx = compiler.compile_train(loss_fn, params, batch0, opt, spec=SPEC, mode="pipelined")
    state = tx.init(params)
    torch_opt = make_torch(reference.parameters())
    for i in range(20):
        state, metrics = tx.step(state, {"x": jnp.asarray(xs[i]), "y": jnp.asarray(ys[i], jnp.int32)})
        torch_opt.zero_grad()
        logits = reference(torch.from_numpy(xs[i]))
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_out), torch.from_numpy(ys[i]).reshape(-1))
        ref_loss.backward()
        torch_opt.step()
        assert abs(float(metrics["loss"]) - ref_loss.item()) <= 1e-4 * abs(ref_loss.item()), i
    trained = compiler.to_torch(copy.deepcopy(module), tx.read_params(state))
    for (n, a), (_, b) in zip(trained.state_dict().items(), reference.state_dict().items()):
        if a.is_floating_point():
            assert rel(a.numpy(), b.numpy()) < 1e-4, n


def test_a_missing_framework_names_its_extra():
    """What a user without the extra sees (simulated: a module that is not installed, under the torch extra)."""
    from compiler.frontend import frameworks

    with pytest.raises(compiler.MissingExtraError, match=r"\[torch\].*pip install -e '\.\[torch\]'") as e:
        frameworks.require("torch", "not_installed_module_for_this_test")
    assert isinstance(e.value, ImportError) and e.value.extra == "torch"
    with pytest.raises(compiler.MissingExtraError, match="--no-deps tf2jax==0.3.8"):
        frameworks.require("tf2jax", "not_installed_module_for_this_test")

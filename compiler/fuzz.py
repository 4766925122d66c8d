"""Property-based fuzzing of the compiler against native JAX (hypothesis; a dev dependency, imported only here).

    from compiler import fuzz
    case = fuzz.build(desc)                 # a random model described by `desc` (drawn by `fuzz.models()`)
    fuzz.check(case)                         # raises AssertionError naming the property that fails

Strategies draw random Flax models from small pieces (dense, conv, depthwise conv, pooling, LayerNorm / RMSNorm /
BatchNorm, self-attention, embeddings, recurrent cells (GRU, LSTM, simple), residual blocks, dropout, tied weights),
with odd and size-1 shapes (batch 1, one feature, one channel), under the fp32, bf16 and fp16 policies, on random
mini wafers, with the automatic placement under random `PlacementParams` or a random valid hand placement.

The properties `check` holds every case to:
  forward    both paths (fast and per-core) equal native `apply_policy(fn, policy)` within the policy's tolerance;
  literal    every weight kernel's anchor (dense, attention projection, per-head einsum, conv, grouped, depthwise
             or batch-grouped conv, embedding lookup, a one-row embedding's broadcast, a tied weight's every use) and
             every weight dot of a recurrent cell's scan runs per core on its tiles, not on reassembled weights
             (`per_core_kinds`);
  params     `read_params(load(p))` equals p leaf for leaf, shapes and dtypes included (under a 16-bit policy, p
             rounded to the storage format);
  sram       the report's peak SRAM per core equals the allocations' occupancy, and every kernel's fullest core holds
             its plan's bytes; nothing is allocated outside the kernels' rectangles;
  counters   compute is charged exactly on the kernels' grids and link words only on kernel rectangles and routes,
             equal to the static record;
  training   `compile_train` steps equal native optax (the losses and the final params), in float32.

tests/compiler/test_fuzz.py runs a bounded, derandomised number in CI; experiments/fuzz.py runs N of them.
A model description is a plain tuple of tuples, so a failure prints as a value that rebuilds the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import strategies as st

import compiler
import wafer

# ---- model descriptions ------------------------------------------------------------------------------------------

INPUTS = ("vector", "image", "sequence", "tokens")
POLICIES = ("fp32", "bf16", "fp16")
ACTS = ("relu", "tanh", "gelu", "none")


@st.composite
def models(draw, max_layers: int = 4, policies=POLICIES):
    """A model description: (input kind, batch, input shape, layers, policy, seed)."""
    kind = draw(st.sampled_from(INPUTS))
    batch = draw(st.sampled_from((1, 2, 3, 4)))
    small = st.sampled_from((1, 2, 3, 5))
    if kind == "vector":
        shape = (draw(st.sampled_from((1, 3, 7, 12))),)
    elif kind == "image":
        shape = (draw(st.sampled_from((1, 3, 5, 6))), draw(st.sampled_from((1, 4, 5))), draw(small))
    elif kind == "sequence":
        shape = (draw(st.sampled_from((1, 3, 4))), draw(st.sampled_from((1, 4, 6))))
    else:
        shape = (draw(st.sampled_from((1, 3, 5))),)
    layers = []
    if kind == "tokens":
        layers.append(("embed", draw(st.sampled_from((1, 7, 13))), draw(st.sampled_from((1, 4, 6)))))
    for _ in range(draw(st.integers(1, max_layers))):
        options = ["dense", "norm", "residual", "tied", "dropout"]
        if kind == "image":
            options += ["conv", "depthwise", "pool"]
        if kind in ("sequence", "tokens"):
            options += ["attention", "recurrent", "conv1d"]
        op = draw(st.sampled_from(options))
        act = draw(st.sampled_from(ACTS))
        if op == "dense":
            layers.append(("dense", draw(st.sampled_from((1, 2, 5, 8))), act))
        elif op == "norm":
            layers.append(("norm", draw(st.sampled_from(("layer", "rms", "batch")))))
        elif op == "residual":
            layers.append(("residual", act))
        elif op == "tied":
            layers.append(("tied", act))
        elif op == "dropout":
            layers.append(("dropout", draw(st.sampled_from((0.0, 0.5)))))
        elif op == "conv":
            layers.append(("conv", draw(st.sampled_from((1, 3, 4))), draw(st.sampled_from((1, 2, 3))), act))
        elif op == "depthwise":
            layers.append(("depthwise", draw(st.sampled_from((1, 3))), act))
        elif op == "pool":
            layers.append(("pool", draw(st.sampled_from(("avg", "max")))))
        elif op == "attention":
            layers.append(("attention", draw(st.sampled_from((1, 2)))))
        elif op == "recurrent":
            layers.append(("recurrent", draw(st.sampled_from(("gru", "lstm", "simple"))), draw(small)))
        elif op == "conv1d":
            layers.append(("conv1d", draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 2))), act))
    head = draw(st.sampled_from((1, 3)))
    policy = draw(st.sampled_from(policies))
    seed = draw(st.integers(0, 2**16))
    return (kind, batch, shape, tuple(layers), head, policy, seed)


@st.composite
def wafers(draw):
    """A random mini wafer (rows and cols 6..14)."""
    return wafer.WaferSpec.mini(draw(st.integers(6, 14)), draw(st.integers(6, 14)))


@st.composite
def placement_params(draw):
    """Random valid PlacementParams."""
    return compiler.PlacementParams(
        area_rule=draw(st.sampled_from(("work", "equal", "sram"))),
        area_exponent=draw(st.sampled_from((0.5, 1.0, 1.5))),
        order=draw(st.sampled_from(("serpentine", "rows"))),
        spacing=draw(st.sampled_from((0, 1))),
        reserve_io_columns=draw(st.booleans()),
    )


@st.composite
def cases(draw, max_layers: int = 4, policies=POLICIES):
    """(model description, spec, placement knobs, placement mode "auto" | "params" | "hand", hand seed)."""
    return (
        draw(models(max_layers, policies)),
        draw(wafers()),
        draw(placement_params()),
        draw(st.sampled_from(("auto", "params", "hand"))),
        draw(st.integers(0, 2**16)),
    )


# ---- building a model ------------------------------------------------------------------------------------------


def _act(name, x):
    return {"relu": nn.relu, "tanh": jnp.tanh, "gelu": nn.gelu, "none": lambda v: v}[name](x)


class Fuzzed(nn.Module):
    """The model a description's layers make (`models`)."""

    layers: tuple
    head: int

    @nn.compact
    def __call__(self, x, key=None):
        for layer in self.layers:
            op = layer[0]
            if op == "embed":
                x = nn.Embed(layer[1], layer[2])(x)
            elif op == "dense":
                x = _act(layer[2], nn.Dense(layer[1])(x))
            elif op == "norm":
                if layer[1] == "layer":
                    x = nn.LayerNorm()(x)
                elif layer[1] == "rms":
                    x = nn.RMSNorm()(x)
                else:
                    x = nn.BatchNorm(use_running_average=True)(x)
            elif op == "residual":
                x = x + _act(layer[1], nn.Dense(x.shape[-1])(x))
            elif op == "tied":
                shared = nn.Dense(x.shape[-1])
                x = shared(_act(layer[1], shared(x)))
            elif op == "dropout":
                x = nn.Dropout(layer[1], deterministic=key is None)(x, rng=key)
            elif op == "conv":
                f, k = layer[1], layer[2]
                x = _act(layer[3], nn.Conv(f, (k, k), padding="SAME")(x))
            elif op == "depthwise":
                k = layer[1]
                x = _act(layer[2], nn.Conv(x.shape[-1], (k, k), feature_group_count=x.shape[-1], padding="SAME")(x))
            elif op == "pool":
                window = (min(2, x.shape[1]), min(2, x.shape[2]))
                pool = nn.avg_pool if layer[1] == "avg" else nn.max_pool
                x = pool(x, window, strides=window)
            elif op == "attention":
                heads = layer[1]
                features = heads * max(1, -(-x.shape[-1] // heads))
                x = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=features)(x)
            elif op == "recurrent":
                cell = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell, "simple": nn.SimpleCell}[layer[1]]
                x = nn.RNN(cell(layer[2]))(x)
            elif op == "conv1d":
                f, k = layer[1], layer[2]
                x = _act(layer[3], nn.Conv(f, (k,), padding="SAME")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.head)(x)


@dataclasses.dataclass(frozen=True)
class Case:
    """A built fuzz case: the function, params and inputs, and how to compile it."""

    desc: tuple
    spec: Any
    fn: Any
    params: Any
    inputs: tuple
    policy: str
    placement_params: Any
    placement_mode: str
    hand_seed: int
    has_dropout: bool

    def __repr__(self):
        return f"Case(desc={self.desc!r}, spec={self.spec.name}, placement={self.placement_mode})"


def build(case_draw) -> Case:
    """A `Case` of one draw of `cases()`."""
    desc, spec, pp, mode, hand_seed = case_draw
    kind, batch, shape, layers, head, policy, seed = desc
    model = Fuzzed(layers=layers, head=head)
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        vocab = layers[0][1]
        x = jnp.asarray(rng.integers(0, vocab, (batch, *shape)), jnp.int32)
    else:
        x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    dropout = any(layer[0] == "dropout" for layer in layers)
    params = model.init(jax.random.key(seed), x)
    # random params (Flax's zero biases and unit scales would hide mistakes in which tile holds what)
    # (a BatchNorm's running variance stays positive)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, v in paths:
        r = 0.5 * rng.standard_normal(np.shape(v))
        if "var" in jax.tree_util.keystr(path):
            r = np.abs(r) + 0.1
        leaves.append(jnp.asarray(r, v.dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    if dropout:
        key = jax.random.key_data(jax.random.key(seed + 1))

        def fn(p, x, key):
            return model.apply(p, x, key=jax.random.wrap_key_data(key))

        inputs = (x, key)
    else:

        def fn(p, x):
            return model.apply(p, x)

        inputs = (x,)
    return Case(case_draw[0], spec, fn, params, inputs, policy, pp, mode, hand_seed, dropout)


# ---- the properties ----------------------------------------------------------------------------------------------

# Named errors that say a drawn model does not fit its drawn wafer (or hand placement): the case is skipped.
DOES_NOT_FIT = (wafer.SramCapacityError, compiler.PlacementError, compiler.ColorError)

TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}  # relative to max |native| (16-bit: rounding of the stored operands)


def _close(got, want, rtol, what, sensitivity=None):
    """Emulated `got` equals native `want` within `rtol` x max(1, max |native|) per leaf; or, where that fails and
    `sensitivity()` is given, within that plus twice native's own change under 1-ulp perturbations
    (`_native_sensitivity`): an ill-conditioned model (a LayerNorm over two features of nearly equal values, say)
    amplifies float32 rounding in native JAX as much as in the emulator, and the emulated result is then as good as
    native's if it is native's at inputs one rounding away."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), f"{what}: trees differ"
    sens = None
    for i, (g, w) in enumerate(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
        scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
        err = float(np.max(np.abs(g - w), initial=0.0))
        if err <= rtol * scale:
            continue
        assert sensitivity is not None, f"{what}: max |emulated - native| {err:.3g} > {rtol:g} x {scale:.3g}"
        sens = sensitivity() if sens is None else sens
        bound = rtol * scale + 2 * sens[i]
        assert err <= bound, (
            f"{what}: max |emulated - native| {err:.3g} > {rtol:g} x {scale:.3g} + 2 x {sens[i]:.3g} (native's own "
            "change under 1-ulp perturbations of params and inputs)"
        )


def _native_sensitivity(fn, params, inputs, native, draws: int = 2) -> list[float]:
    """Per output leaf, the most native's output moves when every float param and input is perturbed by one unit
    of its dtype's epsilon (relative, random sign), over `draws` draws: how much the model amplifies rounding."""

    def perturb(tree, rng):
        def one(a):
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.floating):
                return a
            return (a * (1 + np.finfo(a.dtype).eps * rng.choice([-1.0, 1.0], a.shape))).astype(a.dtype)

        return jax.tree_util.tree_map(one, tree)

    want = [np.asarray(w, np.float64) for w in jax.tree_util.tree_leaves(native)]
    most = [0.0] * len(want)
    for d in range(draws):
        rng = np.random.default_rng(d)
        moved = jax.tree_util.tree_leaves(fn(perturb(params, rng), *perturb(inputs, rng)))
        most = [
            max(m, float(np.max(np.abs(np.asarray(v, np.float64) - w), initial=0.0)))
            for m, v, w in zip(most, moved, want)
        ]
    return most


def _hand_placement(exe, seed: int):
    """A random valid hand placement: the automatic one's rectangles shrunk towards each kernel's fewest cores
    (never below) at a random corner of their own rectangle, so it stays inside and non-overlapping."""
    rng = np.random.default_rng(seed)
    demands = {d.name: d for d in exe.plan.demands}
    out = {}
    for name, r in exe.placement.items():
        d = demands[name]
        h, w = r.height, r.width
        for _ in range(8):
            nh, nw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            if nh * nw >= d.min_cores and nh >= d.min_height and nw >= d.min_width:
                h, w = nh, nw
                break
        row = r.row + int(rng.integers(0, r.height - h + 1))
        col = r.col + int(rng.integers(0, r.width - w + 1))
        out[name] = (row, col, h, w)
    return out


def _rect_mask(rects, rows, cols):
    m = np.zeros((rows, cols), bool)
    for r in rects:
        m[r.row : r.row + r.height, r.col : r.col + r.width] = True
    return m


def _check_counters_and_sram(exe, state):
    spec = exe.spec
    rows, cols = spec.rows, spec.cols
    grids = [wafer.Rect(p.rect.row, p.rect.col, *p.grid) for p in exe.plans.values()]
    busy = np.asarray(state.busy)
    np.testing.assert_array_equal(busy > 0, _rect_mask(grids, rows, cols), "compute charged off the kernels' grids")
    links = np.asarray(state.links)
    np.testing.assert_array_equal(links, exe.record.link_words(rows, cols).astype(np.float32))
    on_route = np.zeros((rows, cols), bool)
    if exe.routes is not None:
        for lanes in exe.routes.paths.values():
            for lane in lanes:
                for r, c in lane:
                    on_route[r, c] = True
    in_kernel = _rect_mask(exe.placement.values(), rows, cols)
    stray = (links.sum(axis=0) > 0) & ~(on_route | in_kernel)
    assert not stray.any(), f"link words outside kernels and routes at {np.argwhere(stray)[:3].tolist()}"
    occ = state.occupancy()
    np.testing.assert_array_equal(occ, exe.memory.occupancy())
    assert occ.max() == exe.report.peak_sram_bytes_per_core, "report's peak SRAM != the allocations'"
    assert not occ[~in_kernel].any(), "SRAM allocated outside the kernels' rectangles"
    for p in exe.plans.values():
        g = wafer.Rect(p.rect.row, p.rect.col, *p.grid)
        assert occ[g.row, g.col] == occ[g.rows, g.cols].max() == p.sram_bytes, f"{p.name}: SRAM != its plan's"


def per_core_kinds(exe) -> dict:
    """{kernel: how the per-core path runs its weights} for every kernel with a weight anchor
    (compiler.plan.partition.anchor_operand: "dense", "batched", "conv", "gather"), "broadcast" for a kernel
    broadcasting a one-row weight (`partition.row_broadcasts`: Flax's Embed(1, D)), and "scan" for a kernel whose
    scan's body multiplies by a weight (each such dot runs as dense on its weight's tiles at every iteration,
    `partition.scan_runs`). Raises AssertionError naming one that would run on reassembled weights (an anchor
    without a per-core rule; a scan's dot in `partition.scan_left_off`, with its reason, or in a kernel whose anchor
    is not run per core)."""
    part = compiler.plan.partition
    out = {}
    for kernel in exe.graph.kernels:
        plan = exe.plans[kernel.name]
        tilings = {t.index: t for t in plan.params}
        eqn, widx, pos, perm = part.anchor_operand(kernel, exe.traced)
        runs, left = part.scan_runs(kernel, exe.traced, tilings), part.scan_left_off(kernel, exe.traced, tilings)
        for d, why in left:
            name = exe.traced.param_paths[d.widx]
            raise AssertionError(f"{kernel.name}: a scan's dot by {name} runs on the assembled weight: {why}")
        if eqn is not None and tilings[widx].layout == "matrix":  # (a one-element or vector weight: one word)
            kind = part.per_core_kind(eqn, tilings[widx], pos, perm)
            assert kind is not None, f"{kernel.name} ({eqn.primitive.name}) does not run per core"
            assert not runs, f"{kernel.name}: a scan's weight dots beside an anchor run on the assembled weights"
            out[kernel.name] = kind
        elif runs:
            out[kernel.name] = "scan"
        elif eqn is None and part.row_broadcasts(kernel, exe.traced, tilings):
            out[kernel.name] = "broadcast"
    return out


def check(case: Case, *, train: bool = True, train_steps: int = 2) -> dict:
    """Hold a case to every property (module docstring). Returns what ran: {"kernels", "train", "skipped",
    "per_core"} ("skipped": the name of the error saying the model does not fit the drawn wafer, else None;
    "per_core": `per_core_kinds`).

    Raises:
      AssertionError: a property fails (the message names it).
    """
    policy = compiler.Policy.of(case.policy)
    kwargs = dict(spec=case.spec, policy=policy)
    if case.placement_mode == "params":
        kwargs["placement_params"] = case.placement_params
    try:
        exe = compiler.compile(case.fn, case.params, *case.inputs, **kwargs)
        if case.placement_mode == "hand":
            hand = _hand_placement(exe, case.hand_seed)
            exe = compiler.compile(case.fn, case.params, *case.inputs, placement=hand, **kwargs)
            assert {k: tuple(v) for k, v in exe.placement.items()} == hand, "hand placement not kept"
    except DOES_NOT_FIT as e:  # a named, expected error: the drawn wafer is too small for the drawn model
        return {"kernels": 0, "train": False, "skipped": f"{type(e).__name__}", "per_core": {}}
    native_fn = jax.jit(compiler.apply_policy(case.fn, policy))
    native = native_fn(case.params, *case.inputs)
    rtol = TOL[case.policy]
    sensitivity = lambda: _native_sensitivity(native_fn, case.params, case.inputs, native)  # noqa: E731  on failure
    load, read_params = jax.jit(exe.init), jax.jit(exe.read_params)  # one XLA compile each, not one per op
    state = load(case.params)
    # params round-trip: exact (16-bit: rounded to the storage format, returned in the caller's dtypes)
    got = read_params(state)
    want = case.params
    if policy.mixed:
        want = jax.tree_util.tree_map(lambda a: policy.load(policy.store(a), a.dtype), case.params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.shape(g) == np.shape(w) and g.dtype == w.dtype, f"read_params: {g.shape}/{g.dtype} != {w.shape}"
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), "read_params(load(p)) != p")
    out, state = exe(state, *case.inputs)
    _close(out, native, rtol, "fast path", sensitivity)
    _check_counters_and_sram(exe, state)
    out, _ = exe(load(case.params), *case.inputs, path="per_core")
    _close(out, native, rtol, "per-core path", sensitivity)
    ran = {"kernels": len(exe.plans), "train": False, "skipped": None, "per_core": per_core_kinds(exe)}
    if train and case.policy == "fp32":
        ran["train"] = _check_training(case, train_steps)
    return ran


def _check_training(case: Case, steps: int) -> bool:
    fn = case.fn

    def loss(p, batch):
        return jnp.mean(fn(p, *batch) ** 2)

    optimizer = optax.adam(1e-2)
    try:
        tx = compiler.compile_train(loss, case.params, case.inputs, optimizer, spec=case.spec, mode="pipelined")
    except (wafer.SramCapacityError, compiler.PlacementError):
        return False  # training keeps gradients and optimizer slots too: it may not fit where inference did
    state, p, opt = jax.jit(tx.init)(case.params), case.params, optimizer.init(case.params)

    @jax.jit
    def native_step(p, opt, batch):
        value, g = jax.value_and_grad(loss)(p, batch)
        u, opt = optimizer.update(g, opt, p)
        return optax.apply_updates(p, u), opt, value

    for _ in range(steps):
        state, metrics = tx.step(state, case.inputs)
        p, opt, value = native_step(p, opt, case.inputs)
        _close(metrics["loss"], value, 1e-5, "training loss")
    _close(jax.jit(tx.read_params)(state), p, 1e-5, "trained params")
    return True

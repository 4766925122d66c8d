"""PyTorch models as plain JAX functions: `fn, params = compiler.from_torch(module)`; `to_torch(module, params)`.

How: `torch.export` turns the module, called on example tensors of the inputs' shapes and dtypes, into an
ExportedProgram; `run_decompositions()` lowers it to core ATen operators; this module runs that graph with a table
of ATen operator -> `jax.numpy`/`jax.lax` (`ATEN`). The function is traced once per input signature and mode
(cached), so under `jax.jit`/`make_jaxpr` it is plain lax primitives that `jax.grad` differentiates and the
compiler places. Every value the graph computes is checked against the shape and dtype that torch's export
recorded for it, so a wrong table entry fails loudly where it happens rather than as a wrong number later.

Why our own importer rather than torchax: torchax 0.0.13, the newest on PyPI, does not import with torch 2.13
(its tables name overloads torch has removed: aten.prod.dim_Dimname, aten.all.dimname and 20 more); with those
names stubbed it runs an MLP, a CNN and a TransformerEncoderLayer within 1.3e-7 of torch, but in train mode the
BatchNorm buffer updates are dropped and dropout draws from a global key. torch.export gives buffer mutations as
outputs and dropout as one `native_dropout` node we key explicitly, and needs no patch of anything. (Measured on
this project's machine; docs/frameworks.md.)

Params: `{"params": {name: array}, "state": {name: array}}` with the module's own `named_parameters()` /
`named_buffers()` names: trainable parameters in "params"; float buffers (BatchNorm running statistics) and
frozen parameters (`requires_grad=False`) in "state". Integer buffers (`num_batches_tracked`) are constants of the
function: JAX without x64 holds no int64, and the compiler trains float leaves only; so BatchNorm with
`momentum=None` (a cumulative average over `num_batches_tracked`) is refused in train mode.
Layout: an `nn.Linear` weight is kept as [in, out] and an `nn.Conv{1,2,3}d` weight (groups=1) as [*kernel, in, out],
the layouts the wafer's dense and convolution kernels tile (the per-core path then runs them literally on their
tiles); `to_torch` transposes them back. Everything else keeps torch's layout.

Modes: inference (`module.eval()`, or `train=False`): `fn(params, *inputs) -> outputs`. Train mode
(`module.train()`, or `train=True`): `fn(params, *inputs, rng=key) -> (outputs, new_params)`: BatchNorm normalises
with the batch's statistics and `new_params["state"]` holds the running statistics torch would have after the call
(momentum, unbiased variance); dropout draws its masks from `rng` (JAX's generator, so the masks differ from
torch's, with the same distribution: zero with probability p, the rest scaled by 1/(1-p)).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compiler.frontend.frameworks import require


class UnsupportedTorchOpError(NotImplementedError):
    """The exported graph uses an ATen operator the importer has no JAX rule for.

    Attributes:
      op: the operator ("aten.foo.default"); source: the module's source line torch recorded, if any.
    """

    def __init__(self, op: str, source: str = "", detail: str = ""):
        self.op, self.source = op, source
        msg = f"torch importer: no JAX rule for {op}"
        if source:
            msg += f" (from {source})"
        if detail:
            msg += f": {detail}"
        else:
            msg += (
                ". Supported operators are the keys of compiler.frontend.torch_import.ATEN; rewrite the layer "
                "with supported ones, or add a rule there"
            )
        super().__init__(msg)


def _torch():
    return require("torch")


# ---- dtypes ----------------------------------------------------------------------------------------------------


def jax_dtype(torch_dtype):
    """The JAX dtype holding a torch dtype (64-bit types narrow to 32 bits unless JAX's x64 is on)."""
    torch = _torch()
    table = {
        torch.float32: jnp.float32,
        torch.float64: jnp.float64,
        torch.float16: jnp.float16,
        torch.bfloat16: jnp.bfloat16,
        torch.int64: jnp.int64,
        torch.int32: jnp.int32,
        torch.int16: jnp.int16,
        torch.int8: jnp.int8,
        torch.uint8: jnp.uint8,
        torch.bool: jnp.bool_,
    }
    if torch_dtype not in table:
        raise TypeError(f"torch importer: dtype {torch_dtype} has no JAX counterpart here")
    return jax.dtypes.canonicalize_dtype(table[torch_dtype])


def torch_dtype(dtype):
    """The torch dtype of an example tensor for a JAX input dtype: JAX's 32-bit integers stand for torch's int64
    (torch's index type: embeddings and losses require it)."""
    torch = _torch()
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and dtype != np.uint8:
        return torch.int64
    table = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(jnp.float16): torch.float16,
        np.dtype(jnp.bfloat16): torch.bfloat16,
        np.dtype(np.uint8): torch.uint8,
        np.dtype(np.bool_): torch.bool,
    }
    if dtype not in table:
        raise TypeError(f"torch importer: input dtype {dtype} has no torch counterpart")
    return table[dtype]


def to_jax(t) -> jax.Array:
    """A torch tensor as a JAX array (detached, on the CPU), in memory of its own.

    A copy, never a view: on the CPU `jnp.asarray` may alias the NumPy buffer that `Tensor.numpy()` shares with the
    tensor, and torch updates buffers in place (a BatchNorm forward in train mode), under a JAX computation that
    has been dispatched asynchronously and not yet read them.
    """
    return jnp.array(np.array(t.detach().cpu().numpy()), dtype=jax_dtype(t.dtype))


# ---- params ----------------------------------------------------------------------------------------------------


def _layouts(module) -> dict[str, tuple]:
    """{parameter name: permutation from torch's layout to the stored one} for Linear and Conv weights."""
    torch = _torch()
    out = {}
    for prefix, m in module.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if isinstance(m, torch.nn.Linear) and w.ndim == 2:
            out[name] = (1, 0)
        elif isinstance(m, torch.nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1:
            out[name] = (*range(2, w.ndim), 1, 0)
    return out


def _split_params(module):
    """(params, constants): params {"params": {...}, "state": {...}} as JAX arrays in stored layout; constants
    {name: array} for integer buffers."""
    layouts = _layouts(module)
    trainable, state, consts = {}, {}, {}
    for name, p in module.named_parameters():
        x = to_jax(p)
        if name in layouts:
            x = jnp.transpose(x, layouts[name])
        (trainable if p.requires_grad else state)[name] = x
    for name, b in module.named_buffers():
        if b.is_floating_point():
            state[name] = to_jax(b)
        else:
            consts[name] = to_jax(b)
    return {"params": trainable, "state": state}, consts, layouts


def to_torch(module, params) -> Any:
    """Write `params` (as `from_torch` made them, e.g. trained on the wafer) into `module`, in place.

    Every name in `params` must be a parameter or buffer of `module` with the same shape (in torch's layout after
    undoing the stored one). Returns `module`.

    Raises:
      KeyError: a name of `params` is not in the module. ValueError: a shape differs.
    """
    torch = _torch()
    layouts = _layouts(module)
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    flat = {**dict(params.get("params", {})), **dict(params.get("state", {}))}
    with torch.no_grad():
        for name, value in flat.items():
            if name not in tensors:
                raise KeyError(f"to_torch: {name!r} is not a parameter or buffer of {type(module).__name__}")
            x = np.asarray(value)
            if name in layouts:
                x = np.transpose(x, np.argsort(layouts[name]))
            t = tensors[name]
            if tuple(x.shape) != tuple(t.shape):
                raise ValueError(f"to_torch: {name!r} has shape {x.shape}, the module's is {tuple(t.shape)}")
            t.copy_(torch.from_numpy(np.array(x)).to(t.dtype))  # a writable copy
    return module


# ---- the importer ----------------------------------------------------------------------------------------------


def from_torch(module, *, train: bool | None = None) -> tuple[Callable, dict]:
    """A `torch.nn.Module` as a plain JAX function and its params.

    Args:
      module: the module; it is not modified (its mode is set for export and restored).
      train: run as in train mode (True) or eval mode (False); None: the module's mode now (`module.training`).
    Returns:
      `(fn, params)`: `fn(params, *inputs, rng=None)` returns the module's outputs (eval mode) or
      `(outputs, new_params)` (train mode; see the module docstring); `params` as described there.
      Inputs are JAX arrays (or pytrees of them, as the module takes); integer inputs stand for torch's int64.
    Raises:
      compiler.MissingExtraError: torch is not installed.
      TypeError: `module` is not a torch.nn.Module.
      ValueError (when called): train mode with BatchNorm momentum=None, or dropout without `rng`.
      UnsupportedTorchOpError (when called): the exported graph uses an operator without a rule.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    train = module.training if train is None else bool(train)
    if train:
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is None:
                raise ValueError(
                    f"from_torch: BatchNorm {name!r} has momentum=None (a cumulative average over "
                    "num_batches_tracked, an int64 counter this importer keeps constant); give it a momentum, "
                    "e.g. 0.1, to train it"
                )
    params, consts, layouts = _split_params(module)
    cache: dict = {}

    def fn(params, *inputs, rng=None):
        leaves, in_spec = torch.utils._pytree.tree_flatten((tuple(inputs), {}))
        key = (str(in_spec), tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves))
        if key not in cache:
            cache[key] = _export(module, inputs, train)
        program = cache[key]
        return _run(program, params, consts, layouts, leaves, rng=rng, train=train)

    fn.__name__ = f"from_torch({type(module).__name__})"
    return fn, params


def _export(module, inputs, train: bool):
    """The module exported and decomposed to core ATen, on zero tensors of the inputs' shapes and dtypes."""
    torch = _torch()

    def example(x):
        return torch.zeros(tuple(jnp.shape(x)), dtype=torch_dtype(jnp.result_type(x)))

    args = torch.utils._pytree.tree_map(example, tuple(inputs))
    was = module.training
    module.train(train)
    try:
        ep = torch.export.export(module, args, strict=False)
        return ep.run_decompositions()
    finally:
        module.train(was)


class _Ctx:
    """What handlers need besides their arguments: the node (for its recorded shape and source) and the key."""

    def __init__(self, rng, train):
        self.rng, self.train, self.node = rng, train, None

    def key(self):
        if self.rng is None:
            raise ValueError(
                f"from_torch: {self.node.target} at {_source(self.node)} draws random numbers in train mode: pass "
                "rng=jax.random.key(seed) to fn (a new key every step), or run the module in eval mode"
            )
        return jax.random.fold_in(self.rng, _node_index(self.node))


def _node_index(node) -> int:
    for i, n in enumerate(node.graph.nodes):
        if n is node:
            return i
    return 0


def _source(node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else str(node.meta.get("nn_module_stack", {}) and list(node.meta["nn_module_stack"]))


class _Lazy:
    """A placeholder's value in torch's layout, built only if some node needs it (a stored-layout weight used
    only by its Linear's permute or its Conv needs no transpose at all)."""

    def __init__(self, make):
        self.make, self.value = make, None

    def get(self):
        if self.value is None:
            self.value = self.make()
        return self.value


def _run(ep, params, consts, layouts, leaves, *, rng, train):
    torch = _torch()
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    stored = {}  # placeholder node -> (stored array, permutation from torch's layout)
    env: dict = {}
    user = iter(leaves)
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            name = spec.target
            if name in params["params"]:
                value = params["params"][name]
            elif name in params["state"]:
                value = params["state"][name]
            elif name in consts:
                value = consts[name]
            else:
                raise KeyError(f"from_torch: params have no {name!r} (expected {sorted(params['params'])})")
            if name in layouts:
                perm = layouts[name]
                stored[node] = (value, perm)
                inv = tuple(int(i) for i in np.argsort(perm))
                env[node] = _Lazy(lambda v=value, inv=inv: jnp.transpose(v, inv))
            else:
                env[node] = value
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            env[node] = to_jax(ep.constants[spec.target])
        elif spec.kind == InputKind.USER_INPUT:
            x = next(user)
            env[node] = jnp.asarray(x) if hasattr(x, "shape") or isinstance(x, (int, float, bool)) else x
        else:
            raise UnsupportedTorchOpError(f"input of kind {spec.kind.name}", detail="custom objects and tokens")

    ctx = _Ctx(rng, train)

    def read(a):
        v = env[a]
        return v.get() if isinstance(v, _Lazy) else v

    outputs = None
    for node in ep.graph.nodes:
        if node.op in ("placeholder",):
            continue
        if node.op == "output":
            outputs = torch.fx.node.map_arg(node.args[0], read)
            break
        if node.op != "call_function":
            raise UnsupportedTorchOpError(f"graph node of kind {node.op!r}", _source(node))
        ctx.node = node
        if node.target is operator.getitem:
            seq = read(node.args[0])
            value = seq[node.args[1]]
            if value is _NOT_COMPUTED:
                raise UnsupportedTorchOpError(str(node.args[0].target), _source(node), "its second output (indices)")
            env[node] = value
            continue
        # stored-layout weights: a Linear's permute([1, 0]) is the stored [in, out] itself; a Conv reads [*k, in, out]
        w = node.args[0] if node.args else None
        if str(node.target) == "aten.permute.default" and w in stored and tuple(stored[w][1]) == (1, 0):
            if [d % 2 for d in node.args[1]] == [1, 0]:
                env[node] = stored[w][0]
                continue
        if str(node.target) == "aten.convolution.default" and node.args[1] in stored:
            args = [read(a) if isinstance(a, torch.fx.Node) and a is not node.args[1] else a for a in node.args]
            args[1] = stored[node.args[1]][0]
            env[node] = _conform(_convolution(ctx, *args, rhs_last=True), node)
            continue
        args = torch.fx.node.map_arg(node.args, read)
        kwargs = torch.fx.node.map_arg(node.kwargs, read)
        env[node] = _conform(_call(ctx, node, args, kwargs), node)

    results = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    new_state = dict(params["state"])
    user_outs = []
    for value, spec in zip(results, sig.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            if spec.target in new_state:
                new_state[spec.target] = value.astype(new_state[spec.target].dtype)
            # integer buffers (num_batches_tracked) are constants: their update is dropped (module docstring)
        elif spec.kind == OutputKind.USER_OUTPUT:
            user_outs.append(value)
        else:
            raise UnsupportedTorchOpError(
                f"output of kind {spec.kind.name}", detail="in-place updates of inputs or parameters in forward"
            )
    out_spec = ep.call_spec.out_spec
    out = torch.utils._pytree.tree_unflatten(user_outs, out_spec) if out_spec is not None else user_outs[0]
    if train:
        return out, {"params": params["params"], "state": new_state}
    return out


def _call(ctx, node, args, kwargs):
    target = node.target
    name = str(target)  # "aten.add.Tensor"
    rule = ATEN.get(name) or ATEN.get(name.rsplit(".", 1)[0])
    if rule is None:
        raise UnsupportedTorchOpError(name, _source(node))
    schema = getattr(target, "_schema", None)
    if schema is None:
        return rule(ctx, *args, **kwargs)
    bound = list(args)
    for a in schema.arguments[len(args) :]:
        if a.name in kwargs:
            bound.append(kwargs[a.name])
        elif a.has_default_value():
            bound.append(a.default_value)
        elif a.kwarg_only and a.name.startswith("out"):
            break
        else:
            bound.append(None)
    return rule(ctx, *bound)


def _conform(value, node):
    """`value` cast to the dtype torch recorded for `node`; its shape must be the recorded one."""
    meta = node.meta.get("val")
    if meta is None:
        return value
    if isinstance(value, (tuple, list)) and isinstance(meta, (tuple, list)):
        return type(value)(_conform_one(v, m, node) for v, m in zip(value, meta))
    return _conform_one(value, meta, node)


def _conform_one(value, meta, node):
    if value is _NOT_COMPUTED or not hasattr(meta, "shape") or not hasattr(meta, "dtype"):
        return value
    value = jnp.asarray(value)
    want = tuple(int(d) for d in meta.shape)
    if tuple(value.shape) != want:
        raise AssertionError(
            f"torch importer: {node.target} gave shape {tuple(value.shape)}, torch records {want}; this is a bug in "
            "its rule (compiler/frontend/torch_import.py)"
        )
    dtype = jax_dtype(meta.dtype)
    return value if value.dtype == dtype else value.astype(dtype)


_NOT_COMPUTED = object()  # an output torch's op has but no consumer reads here (max-pool indices)


# ---- the ATen table --------------------------------------------------------------------------------------------


def _dims(dim, ndim):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(sorted(d % ndim if ndim else 0 for d in dim))


def _pair(v, n):
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def _scalar(x):
    return x


def _add(ctx, a, b, alpha=1):
    return a + (b if alpha == 1 else b * alpha)


def _sub(ctx, a, b, alpha=1):
    return a - (b if alpha == 1 else b * alpha)


def _div(ctx, a, b, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(a, b)
    if rounding_mode == "floor":
        return jnp.floor_divide(a, b)
    q = jnp.true_divide(a, b)
    out = jnp.trunc(q)
    return out.astype(jnp.result_type(a, b)) if jnp.issubdtype(jnp.result_type(a, b), jnp.integer) else out


def _addmm(ctx, bias, a, b, beta=1, alpha=1):
    prod = jnp.matmul(a, b)
    if alpha != 1:
        prod = prod * alpha
    if beta == 0:
        return prod
    return prod + (bias if beta == 1 else bias * beta)


def _convolution(ctx, x, w, bias, stride, padding, dilation, transposed, output_padding, groups, *, rhs_last=False):
    nd = x.ndim - 2
    stride, padding, dilation = _pair(stride, nd), _pair(padding, nd), _pair(dilation, nd)
    sp = "DHW"[3 - nd :]
    lhs = f"NC{sp}"
    if transposed:
        # weight [in, out/groups, *k]: a dilated convolution of the input with the flipped, swapped kernel
        cin = w.shape[0]
        wg = w.reshape(groups, cin // groups, *w.shape[1:])
        wg = jnp.swapaxes(wg, 1, 2).reshape(groups * w.shape[1], cin // groups, *w.shape[2:])
        wg = jnp.flip(wg, axis=tuple(range(2, 2 + nd)))
        k = w.shape[2:]
        output_padding = _pair(output_padding, nd)
        pads = [
            (dilation[i] * (k[i] - 1) - padding[i], dilation[i] * (k[i] - 1) - padding[i] + output_padding[i])
            for i in range(nd)
        ]
        y = jax.lax.conv_general_dilated(
            x,
            wg,
            window_strides=(1,) * nd,
            padding=pads,
            lhs_dilation=stride,
            rhs_dilation=dilation,
            dimension_numbers=(lhs, f"OI{sp}", lhs),
            feature_group_count=groups,
        )
    else:
        rhs = f"{sp}IO" if rhs_last else f"OI{sp}"
        y = jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=stride,
            padding=[(p, p) for p in padding],
            rhs_dilation=dilation,
            dimension_numbers=(lhs, rhs, lhs),
            feature_group_count=groups,
        )
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * nd))
    return y


def _pool_pads(size, k, s, p, d, ceil_mode):
    """(low, high) padding of one spatial axis so that reduce_window gives torch's output length."""
    eff = d * (k - 1) + 1
    n = size + 2 * p - eff
    out = (-(-n // s) if ceil_mode else n // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # torch: the last window must start inside the input or left pad
        out -= 1
    high = max(0, (out - 1) * s + eff - size - p)
    return (p, high), out


def _max_pool(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    nd = len(_pair(kernel_size, 1)) if not isinstance(kernel_size, int) else 2
    k = _pair(kernel_size, nd)
    s = _pair(stride, nd) if stride not in ((), [], None) else k
    p, d = _pair(padding, nd), _pair(dilation, nd)
    lead = x.ndim - nd
    pads = [(0, 0)] * lead + [_pool_pads(x.shape[lead + i], k[i], s[i], p[i], d[i], ceil_mode)[0] for i in range(nd)]
    init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    y = jax.lax.reduce_window(
        x,
        np.array(init, x.dtype),  # a concrete identity: JAX then uses reduce_window_max, which has a VJP
        jax.lax.max,
        (1,) * lead + k,
        (1,) * lead + s,
        pads,
        window_dilation=(1,) * lead + d,
    )
    return y, _NOT_COMPUTED


def _avg_pool(ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor=None):
    nd = len(_pair(kernel_size, 1)) if not isinstance(kernel_size, int) else 2
    k = _pair(kernel_size, nd)
    s = _pair(stride, nd) if stride not in ((), [], None) else k
    p = _pair(padding, nd)
    lead = x.ndim - nd
    pads = [(0, 0)] * lead + [_pool_pads(x.shape[lead + i], k[i], s[i], p[i], 1, ceil_mode)[0] for i in range(nd)]
    window, strides = (1,) * lead + k, (1,) * lead + s
    total = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, window, strides, pads)
    if divisor:
        return total / divisor
    if count_include_pad:
        # torch counts the explicit padding but not the extra ceil_mode overhang
        ones = jnp.pad(jnp.ones(x.shape[lead:], x.dtype), [(pp, pp) for pp in p])
        extra = [(0, 0)] + [(0, pads[lead + i][1] - p[i]) for i in range(nd)]
        count = jax.lax.reduce_window(
            ones[None], np.array(0, x.dtype), jax.lax.add, (1, *k), (1, *s), [(a, max(b, 0)) for a, b in extra]
        )[0]
    else:
        count = jax.lax.reduce_window(
            jnp.ones(x.shape[lead:], x.dtype), np.array(0, x.dtype), jax.lax.add, k, s, pads[lead:]
        )
    return total / count


def _batch_norm_eval(ctx, x, w, b, mean, var, momentum, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = jax.lax.rsqrt(var + eps)
    y = (x - mean.reshape(shape)) * inv.reshape(shape)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    empty = jnp.zeros((0,), x.dtype)
    return y, empty, empty


def _batch_norm_train(ctx, x, w, b, running_mean, running_var, training, momentum, eps):
    if not training:
        y, _, _ = _batch_norm_eval(ctx, x, w, b, running_mean, running_var, momentum, eps)
        return y, jnp.zeros((0,), x.dtype), jnp.zeros((0,), x.dtype), running_mean, running_var
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = math.prod(x.shape[a] for a in axes)
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=axes)
    inv = jax.lax.rsqrt(var + eps)
    y = (x - mean.reshape(shape)) * inv.reshape(shape)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    # torch's running statistics: the unbiased variance, a momentum-weighted average; never differentiated
    mean_sg, var_sg = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    new_mean = (1 - momentum) * running_mean + momentum * mean_sg
    new_var = (1 - momentum) * running_var + momentum * var_sg * (n / max(n - 1, 1))
    return y, mean, inv, new_mean, new_var


def _layer_norm(ctx, x, normalized_shape, w, b, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x - mean) * rstd
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, mean, rstd


def _group_norm(ctx, x, w, b, n, c, hw, groups, eps):
    xg = x.reshape(n, groups, -1)
    mean = jnp.mean(xg, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = ((xg - mean) * rstd).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y, mean.reshape(n, groups), rstd.reshape(n, groups)


def _dropout(ctx, x, p, train):
    if not train or p == 0:
        return x, jnp.ones(x.shape, jnp.bool_)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, jnp.bool_)
    keep = jax.random.bernoulli(ctx.key(), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype)), keep


def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    dim = dim % x.ndim
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else end
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    start, end = max(0, min(start, n)), max(0, min(end, n))
    if end <= start:
        shape = list(x.shape)
        shape[dim] = 0
        return jnp.zeros(shape, x.dtype)
    return jax.lax.slice_in_dim(x, start, end, step, axis=dim)


def _index(ctx, x, indices):
    idx = tuple(slice(None) if i is None else i for i in indices)
    return x[idx]


def _var(ctx, x, dim=None, correction=None, keepdim=False):
    axes = _dims(dim, x.ndim)
    n = math.prod(x.shape[a] for a in axes)
    c = 1 if correction is None else correction
    mean = jnp.mean(x, axis=axes, keepdims=True)
    s = jnp.sum(jnp.square(x - mean), axis=axes, keepdims=keepdim)
    return s / max(n - c, 0)


def _nll_loss(ctx, logp, target, weight, reduction, ignore_index):
    # logp [N, C] or [C]; target [N] or []
    if logp.ndim == 1:
        logp, target = logp[None], target[None]
    valid = target != ignore_index
    safe = jnp.where(valid, target, 0)
    picked = jnp.take_along_axis(logp, safe[:, None].astype(jnp.int32), axis=1)[:, 0]
    wt = (weight[safe] if weight is not None else jnp.ones_like(picked)) * valid.astype(logp.dtype)
    losses = -picked * wt
    total = jnp.sum(wt)
    if reduction == 0:
        return losses, total
    if reduction == 1:
        return jnp.sum(losses) / total, total
    return jnp.sum(losses), total


def _full(ctx, size, value, dtype=None, *rest):
    dt = jax_dtype(dtype) if dtype is not None else None
    return jnp.full(tuple(size), value, dtype=dt)


def _full_like(ctx, x, value, dtype=None, *rest):
    return jnp.full(x.shape, value, dtype=jax_dtype(dtype) if dtype is not None else x.dtype)


def _arange(ctx, *args):
    nums = [a for a in args if isinstance(a, (int, float))]
    dtype = next((a for a in args if a is not None and not isinstance(a, (int, float, bool, str))), None)
    try:
        dt = jax_dtype(dtype) if dtype is not None else None
    except TypeError:
        dt = None
    return jnp.arange(*nums, dtype=dt)


def _to_copy(ctx, x, dtype=None, *rest):
    return x if dtype is None else jnp.asarray(x).astype(jax_dtype(dtype))


def _softmax(ctx, x, dim, half_to_float=False):
    return jax.nn.softmax(x, axis=dim)


def _log_softmax(ctx, x, dim, half_to_float=False):
    return jax.nn.log_softmax(x, axis=dim)


def _reduce(fn):
    def rule(ctx, x, dim=None, keepdim=False, dtype=None):
        out = fn(x, axis=_dims(dim, x.ndim), keepdims=keepdim)
        return out if dtype is None else out.astype(jax_dtype(dtype))

    return rule


def _minmax_dim(fn, arg):
    def rule(ctx, x, dim, keepdim=False):
        return fn(x, axis=dim, keepdims=keepdim), arg(x, axis=dim, keepdims=keepdim)

    return rule


def _squeeze(ctx, x, dim=None):
    if dim is None:
        return jnp.squeeze(x)
    dims = tuple(d % x.ndim for d in ([dim] if isinstance(dim, int) else dim) if x.shape[d % x.ndim] == 1)
    return jnp.squeeze(x, axis=dims) if dims else x


def _expand(ctx, x, size, implicit=False):
    size = list(size)
    lead = len(size) - x.ndim
    shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
    return jnp.broadcast_to(x, shape)


def _split_with_sizes(ctx, x, sizes, dim=0):
    idx = np.cumsum(sizes)[:-1].tolist()
    return list(jnp.split(x, idx, axis=dim))


def _split(ctx, x, size, dim=0):
    n = x.shape[dim]
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    return _split_with_sizes(ctx, x, sizes, dim)


def _constant_pad(ctx, x, pad, value=0):
    cfg = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        cfg[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return jax.lax.pad(x, jnp.array(value, x.dtype), cfg)


def _gelu(ctx, x, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _clamp(ctx, x, lo=None, hi=None):
    if lo is not None:
        x = jnp.maximum(x, lo)
    if hi is not None:
        x = jnp.minimum(x, hi)
    return x


def _where(ctx, c, a, b):
    return jnp.where(c, a, b)


def _unary(fn):
    return lambda ctx, x, *rest: fn(x)


def _binary(fn):
    return lambda ctx, a, b, *rest: fn(a, b)


def _embedding(ctx, w, idx, padding_idx=-1, *rest):
    return jnp.take(w, idx.astype(jnp.int32), axis=0)


def _cat(ctx, xs, dim=0):
    xs = [x for x in xs if not (x.ndim == 1 and x.shape[0] == 0)] or list(xs)[:1]
    return jnp.concatenate(xs, axis=dim)


def _gather(ctx, x, dim, index, sparse_grad=False):
    return jnp.take_along_axis(x, index.astype(jnp.int32), axis=dim)


def _index_select(ctx, x, dim, index):
    return jnp.take(x, index.astype(jnp.int32), axis=dim)


def _select(ctx, x, dim, index):
    return jax.lax.index_in_dim(x, index % x.shape[dim], axis=dim, keepdims=False)


def _repeat(ctx, x, repeats):
    lead = len(repeats) - x.ndim
    x = x.reshape((1,) * lead + x.shape)
    return jnp.tile(x, repeats)


def _leaky_relu(ctx, x, slope=0.01):
    return jnp.where(x > 0, x, x * slope)


def _elu(ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return scale * jnp.where(x > 0, x, alpha * jnp.expm1(x * input_scale))


def _hardtanh(ctx, x, lo=-1.0, hi=1.0):
    return jnp.clip(x, lo, hi)


def _softplus(ctx, x, beta=1.0, threshold=20.0):
    return jnp.where(x * beta > threshold, x, jnp.log1p(jnp.exp(x * beta)) / beta)


ATEN: dict[str, Callable] = {
    # matmuls and convolutions
    "aten.addmm": _addmm,
    "aten.mm": _binary(jnp.matmul),
    "aten.bmm": _binary(jnp.matmul),
    "aten.matmul": _binary(jnp.matmul),
    "aten.convolution": _convolution,
    # elementwise
    "aten.add": _add,
    "aten.sub": _sub,
    "aten.rsub": lambda ctx, a, b, alpha=1: b - a * alpha,
    "aten.mul": _binary(jnp.multiply),
    "aten.div": _div,
    "aten.pow": _binary(jnp.power),
    "aten.maximum": _binary(jnp.maximum),
    "aten.minimum": _binary(jnp.minimum),
    "aten.fmod": _binary(jnp.fmod),
    "aten.remainder": _binary(jnp.remainder),
    "aten.atan2": _binary(jnp.arctan2),
    "aten.eq": _binary(jnp.equal),
    "aten.ne": _binary(jnp.not_equal),
    "aten.lt": _binary(jnp.less),
    "aten.le": _binary(jnp.less_equal),
    "aten.gt": _binary(jnp.greater),
    "aten.ge": _binary(jnp.greater_equal),
    "aten.logical_and": _binary(jnp.logical_and),
    "aten.logical_or": _binary(jnp.logical_or),
    "aten.logical_xor": _binary(jnp.logical_xor),
    "aten.logical_not": _unary(jnp.logical_not),
    "aten.bitwise_and": _binary(jnp.bitwise_and),
    "aten.bitwise_or": _binary(jnp.bitwise_or),
    "aten.bitwise_not": _unary(jnp.invert),
    "aten.where": _where,
    "aten.clamp": _clamp,
    "aten.neg": _unary(jnp.negative),
    "aten.abs": _unary(jnp.abs),
    "aten.sign": _unary(jnp.sign),
    "aten.exp": _unary(jnp.exp),
    "aten.expm1": _unary(jnp.expm1),
    "aten.log": _unary(jnp.log),
    "aten.log1p": _unary(jnp.log1p),
    "aten.log2": _unary(jnp.log2),
    "aten.sqrt": _unary(jnp.sqrt),
    "aten.rsqrt": _unary(jax.lax.rsqrt),
    "aten.reciprocal": _unary(jnp.reciprocal),
    "aten.sin": _unary(jnp.sin),
    "aten.cos": _unary(jnp.cos),
    "aten.tanh": _unary(jnp.tanh),
    "aten.sigmoid": _unary(jax.nn.sigmoid),
    "aten.erf": _unary(jax.scipy.special.erf),
    "aten.floor": _unary(jnp.floor),
    "aten.ceil": _unary(jnp.ceil),
    "aten.round": _unary(jnp.round),
    "aten.trunc": _unary(jnp.trunc),
    "aten.isnan": _unary(jnp.isnan),
    "aten.isinf": _unary(jnp.isinf),
    "aten.relu": _unary(jax.nn.relu),
    "aten.gelu": _gelu,
    "aten.silu": _unary(jax.nn.silu),
    "aten.leaky_relu": _leaky_relu,
    "aten.elu": _elu,
    "aten.hardtanh": _hardtanh,
    "aten.softplus": _softplus,
    "aten.clone": _unary(_scalar),
    "aten.alias": _unary(_scalar),
    "aten.detach": _unary(_scalar),
    "aten.lift_fresh_copy": _unary(_scalar),
    "aten.copy": lambda ctx, dst, src, *rest: jnp.broadcast_to(src, dst.shape).astype(dst.dtype),
    "aten._to_copy": _to_copy,
    # shapes and data movement
    "aten.view": lambda ctx, x, size: jnp.reshape(x, tuple(size)),
    "aten._unsafe_view": lambda ctx, x, size: jnp.reshape(x, tuple(size)),
    "aten.reshape": lambda ctx, x, size: jnp.reshape(x, tuple(size)),
    "aten.permute": lambda ctx, x, dims: jnp.transpose(x, tuple(d % x.ndim for d in dims)),
    "aten.transpose": lambda ctx, x, a, b: jnp.swapaxes(x, a, b),
    "aten.t": lambda ctx, x: x.T,
    "aten.expand": _expand,
    "aten.squeeze": _squeeze,
    "aten.unsqueeze": lambda ctx, x, dim: jnp.expand_dims(x, dim % (x.ndim + 1)),
    "aten.cat": _cat,
    "aten.split_with_sizes": _split_with_sizes,
    "aten.split": _split,
    "aten.slice": _slice,
    "aten.select": _select,
    "aten.index": _index,
    "aten.gather": _gather,
    "aten.index_select": _index_select,
    "aten.flip": lambda ctx, x, dims: jnp.flip(x, axis=tuple(dims)),
    "aten.constant_pad_nd": _constant_pad,
    "aten.repeat": _repeat,
    "aten.embedding": _embedding,
    "aten.full": _full,
    "aten.full_like": _full_like,
    "aten.zeros_like": lambda ctx, x, dtype=None, *rest: _full_like(ctx, x, 0, dtype),
    "aten.ones_like": lambda ctx, x, dtype=None, *rest: _full_like(ctx, x, 1, dtype),
    "aten.scalar_tensor": lambda ctx, v, dtype=None, *rest: jnp.asarray(v, jax_dtype(dtype) if dtype else None),
    "aten.arange": _arange,
    # reductions
    "aten.sum": _reduce(jnp.sum),
    "aten.mean": _reduce(jnp.mean),
    "aten.prod": _reduce(jnp.prod),
    "aten.amax": lambda ctx, x, dim=(), keepdim=False: jnp.max(x, axis=_dims(dim, x.ndim), keepdims=keepdim),
    "aten.amin": lambda ctx, x, dim=(), keepdim=False: jnp.min(x, axis=_dims(dim, x.ndim), keepdims=keepdim),
    "aten.max.dim": _minmax_dim(jnp.max, jnp.argmax),
    "aten.min.dim": _minmax_dim(jnp.min, jnp.argmin),
    "aten.max.default": lambda ctx, x: jnp.max(x),
    "aten.min.default": lambda ctx, x: jnp.min(x),
    "aten.argmax": lambda ctx, x, dim=None, keepdim=False: jnp.argmax(x, axis=dim, keepdims=keepdim),
    "aten.argmin": lambda ctx, x, dim=None, keepdim=False: jnp.argmin(x, axis=dim, keepdims=keepdim),
    "aten.any": lambda ctx, x, dim=None, keepdim=False: jnp.any(x, axis=_dims(dim, x.ndim), keepdims=keepdim),
    "aten.all": lambda ctx, x, dim=None, keepdim=False: jnp.all(x, axis=_dims(dim, x.ndim), keepdims=keepdim),
    "aten.var": _var,
    "aten.cumsum": lambda ctx, x, dim, dtype=None: jnp.cumsum(x, axis=dim),
    "aten.logsumexp": lambda ctx, x, dim, keepdim=False: jax.nn.logsumexp(x, axis=_dims(dim, x.ndim), keepdims=keepdim),
    "aten._softmax": _softmax,
    "aten._log_softmax": _log_softmax,
    # normalisation, pooling, dropout, losses
    "aten._native_batch_norm_legit_no_training": _batch_norm_eval,
    "aten._native_batch_norm_legit_functional": _batch_norm_train,
    "aten.native_layer_norm": _layer_norm,
    "aten.native_group_norm": _group_norm,
    "aten.max_pool2d_with_indices": _max_pool,
    "aten.max_pool3d_with_indices": _max_pool,
    "aten.avg_pool2d": _avg_pool,
    "aten.avg_pool3d": _avg_pool,
    "aten.native_dropout": _dropout,
    "aten.nll_loss_forward": _nll_loss,
}
"""ATen operator (by "aten.name.overload", or "aten.name" for every overload) -> rule(ctx, *schema-ordered args)."""

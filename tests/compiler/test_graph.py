"""compiler.graph: kernels as the Cerebras compiler's library would match them."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from model_zoo import EXPECTED_KINDS, MODELS

import wafer
from compiler.errors import UnsupportedOpError
from compiler.frontend.graph import KINDS, SUPPORTED_PRIMITIVES, Graph, Kernel, build_graph, nbytes
from compiler.frontend.trace import trace
from wafer.kernel import arithmetic

SEQUENTIAL = ("mlp", "lenet", "resnet_block", "depthwise", "rmsnorm", "nnx_mlp", "rnn")


def _dense_macs(eqn) -> int:
    """B*K*N of a dot_general: output elements times contracted elements."""
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernel_kinds_in_order(model, name):
    _, _, graph = model(name)
    assert tuple(k.kind for k in graph.kernels) == EXPECTED_KINDS[name]
    assert all(k.kind in KINDS for k in graph.kernels)
    assert [k.index for k in graph.kernels] == list(range(len(graph.kernels)))
    for kind in KINDS:
        names = [k.name for k in graph.kernels if k.kind == kind]
        assert names == [f"{kind}_{i}" for i in range(len(names))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_equation_in_exactly_one_kernel(model, name):
    _, traced, graph = model(name)
    ids = [id(e) for k in graph.kernels for e in k.eqns]
    assert sorted(ids) == sorted(id(e) for e in traced.jaxpr.eqns)
    position = {id(e): i for i, e in enumerate(traced.jaxpr.eqns)}
    for k in graph.kernels:
        assert [position[id(e)] for e in k.eqns] == sorted(position[id(e)] for e in k.eqns)
        assert k.ops == tuple(e.primitive.name for e in k.eqns)
        if k.kind != "elementwise":
            assert k.anchor in k.eqns


@pytest.mark.parametrize("name", sorted(MODELS))
def test_values_flow_forward_along_edges(model, name):
    _, traced, graph = model(name)
    index = {k.name: k.index for k in graph.kernels}
    defined_by = {v: k for k in graph.kernels for e in k.eqns for v in e.outvars}
    inputs = set(traced.input_vars)
    edge_bytes = {}
    for k in graph.kernels:
        for v in k.inputs:
            assert v in inputs or v in defined_by[v].outputs
            if v not in inputs:
                assert index[defined_by[v].name] < k.index
                pair = (defined_by[v].name, k.name)
                edge_bytes[pair] = edge_bytes.get(pair, 0) + nbytes(v.aval)
        assert k.preds == tuple(sorted({defined_by[v].name for v in k.inputs if v not in inputs}, key=index.get))
        assert k.in_bytes == sum(nbytes(v.aval) for v in k.inputs)
        assert k.out_bytes == sum(nbytes(v.aval) for v in k.outputs)
    assert {(s, d): b for s, d, b in graph.edges} == edge_bytes
    assert all(index[s] < index[d] for s, d, _ in graph.edges)
    outs = [v for v in traced.jaxpr.outvars if isinstance(v, jcore.Var)]
    assert all(v in defined_by[v].outputs for v in outs)
    assert graph.sinks and graph.sources


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_sequential_models_chain_consecutive_kernels(model, name):
    _, _, graph = model(name)
    names = graph.names
    assert [(s, d) for s, d, _ in graph.edges] == list(zip(names, names[1:]))
    assert graph.sources[0] == names[0] and graph.sinks == names[-1:]  # (a shortcut may read the input too)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_all_owned(model, name):
    _, traced, graph = model(name)
    assert graph.unused_params == ()
    assert sorted(graph.param_owner) == list(range(traced.n_params))
    for p, owner in graph.param_owner.items():
        assert p in graph.kernel(owner).params
        assert all(graph.kernel(owner).index < graph.kernel(s).index for s in graph.shared_params.get(p, ()))
    assert graph.shared_params == {}
    for k in graph.kernels:
        assert k.param_bytes == sum(nbytes(traced.param_avals[p]) for p in k.params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_flops(model, name):
    """A dense kernel does B*K*N FMACs for its matmul, plus its epilogue."""
    _, _, graph = model(name)
    for k in graph.kernels:
        # count keys: (op class, dtype class, SRAM read bytes, write bytes) -> elements, and ("instr",), ("ops",)
        arith = {key: c for key, c in k.counts.items() if key[0] in ("fmac", "alu", "special")}
        assert all(len(key) == 4 for key in arith) and set(k.counts) - set(arith) <= {("instr",), ("ops",)}
        assert k.flops == sum(c * (2 if key[0] == "fmac" else 1) for key, c in arith.items())
        assert k.counts[("instr",)] >= k.counts[("ops",)] >= 1  # every operation issues one instruction at least
        if k.kind in ("dense", "matmul"):
            macs = _dense_macs(k.anchor)
            assert arithmetic(k.counts)[("fmac", "fp32")] >= macs
            assert k.flops >= 2 * macs
            assert k.batch == k.anchor.invars[0].aval.shape[0]


# The MLP's counts by hand (wafer/kernel.py's rules). x[4, K] @ W[K, N] runs in the loop order with fewer vector
# instructions: along the longer free axis, K x min(4, N) instructions reading the vector operand and the accumulator
# (4 + 4 bytes) and writing the accumulator (4); or one dot product per output element, 4 x N instructions reading
# both operands (4 + 4) and writing nothing (the sum stays in a register). The bias add reads two vectors (8) and
# writes one (4); the relu max(h, 0.0) reads one (its 0.0 is a scalar in a register) and writes one.
#   dense_0 [4,12] @ [12,13]: 12 x 4 = 48 <= 4 x 13 = 52: along the free axis, 48 instructions of 624 FMACs
#   dense_1 [4,13] @ [13,10]: 13 x 4 = 52 >  4 x 10 = 40: dot products, 40 instructions of 520 FMACs
#   dense_2 [4,10] @ [10, 8]: 10 x 4 = 40 >  4 x 8  = 32: dot products, 32 instructions of 320 FMACs
MLP_COUNTS = {
    "dense_0": {
        ("fmac", "fp32", 8, 4): 4 * 12 * 13,
        ("alu", "fp32", 8, 4): 4 * 13,
        ("alu", "fp32", 4, 4): 4 * 13,
        ("instr",): 48 + 1 + 1,
        ("ops",): 3,
    },
    "dense_1": {
        ("fmac", "fp32", 8, 0): 4 * 13 * 10,
        ("alu", "fp32", 8, 4): 4 * 10,
        ("alu", "fp32", 4, 4): 4 * 10,
        ("instr",): 40 + 1 + 1,
        ("ops",): 3,
    },
    "dense_2": {("fmac", "fp32", 8, 0): 4 * 10 * 8, ("alu", "fp32", 8, 4): 4 * 8, ("instr",): 32 + 1, ("ops",): 2},
}


def test_mlp_kernels_exactly(model):
    """MLP: each dense is 2*B*K*N flops, plus B*N for the bias and B*N for the relu (not after the last layer)."""
    case, traced, graph = model("mlp")
    assert graph.names == ("dense_0", "dense_1", "dense_2")
    b, k = case.inputs[0].shape
    for kernel, (n, relu) in zip(graph.kernels, ((13, True), (10, True), (8, False))):
        assert kernel.counts == MLP_COUNTS[kernel.name]
        assert arithmetic(kernel.counts)[("fmac", "fp32")] == b * k * n
        assert kernel.flops == 2 * b * k * n + b * n * (2 if relu else 1)
        assert kernel.param_bytes == 4 * (k * n + n)
        assert kernel.in_bytes == 4 * b * k and kernel.out_bytes == 4 * b * n
        assert kernel.batch == b
        assert ("max" in kernel.ops) == relu
        paths = {traced.param_paths[p] for p in kernel.params}
        assert paths == {f"params/Dense_{kernel.index}/kernel", f"params/Dense_{kernel.index}/bias"}
        k = n
    assert [b for _, _, b in graph.edges] == [4 * 4 * 13, 4 * 4 * 10]
    line = _line_in_models("x = nn.Dense(f)(x)")
    assert all(kernel.source.endswith(f"model_zoo.py:{line}") for kernel in graph.kernels)


def test_cnn_epilogues_and_prologues(model):
    _, _, graph = model("lenet")
    conv_0, pool_0, conv_1, pool_1, dense_0, _ = graph.kernels
    assert conv_0.ops == ("conv_general_dilated", "reshape", "add", "max")  # bias and relu fused
    assert pool_0.ops == ("reduce_window_sum", "div")  # average pooling
    assert pool_1.ops == ("reduce_window_max",)
    assert dense_0.ops[0] == "reshape"  # the flatten is the dense kernel's prologue
    # average pooling: a 2x2 window sum, one instruction per window element over the 2x8x8x6 outputs (reading the
    # accumulator and the input, writing the accumulator), then the division by 4.0: a special function (16
    # instructions of its software sequence) reading one vector and writing one
    assert pool_0.counts == {
        ("alu", "fp32", 8, 4): 2 * 8 * 8 * 6 * 4,
        ("special", "fp32", 4, 4): 2 * 8 * 8 * 6,
        ("instr",): 4 + 16,
        ("ops",): 2,
    }
    # conv: output elements times (in channels x kernel window) FMACs, a matmul of 2x16x16 positions by 6 output
    # channels over a depth of 25: along the 6 channels, 25 x 6 = 150 instructions (fewer than 512 x 6 dot products)
    assert conv_0.counts[("fmac", "fp32", 8, 4)] == 2 * 16 * 16 * 6 * (1 * 5 * 5)
    assert conv_0.counts[("instr",)] == 25 * 6 + 1 + 1  # and the bias add and the relu
    assert conv_0.batch == 2 and conv_0.params and not pool_0.params
    assert not conv_0.depthwise


def test_resnet_block_fuses_batchnorm(model):
    _, traced, graph = model("resnet_block")
    conv_0, conv_1, conv_2 = graph.kernels
    assert all(k.has_norm for k in graph.kernels)
    assert conv_2.ops[-2:] == ("add", "max")  # residual add and relu close the last kernel
    assert {traced.param_paths[p].split("/")[0] for p in conv_0.params} == {"params", "batch_stats"}
    assert conv_2.preds == ("conv_1",) and conv_2.inputs[0] in traced.input_vars  # the shortcut reads the input


def test_depthwise_conv(model):
    _, _, graph = model("depthwise")
    conv_0, conv_1 = graph.kernels
    assert conv_0.depthwise and not conv_1.depthwise
    # depthwise: one 3x3 filter per channel, stride 2 on 9x9 (SAME): 5x5 outputs; 6 groups of a matmul of 2x5x5
    # positions by 1 output channel over a depth of 9: along the channel, 6 x 9 x 1 = 54 instructions
    assert conv_0.counts[("fmac", "fp32", 8, 4)] == 2 * 5 * 5 * 6 * 9
    assert conv_0.counts[("instr",)] == 6 * 9 + 1 + 1


def test_attention_kernels(model):
    _, _, graph = model("encoder_block")
    matmul_0, matmul_1 = graph.kernel("matmul_0"), graph.kernel("matmul_1")
    assert matmul_0.has_softmax and not matmul_0.params and "select_n" in matmul_0.ops  # masked softmax
    qkv = {"dense_0", "dense_1", "dense_2"}
    assert len(matmul_0.preds) == 2 and set(matmul_0.preds) < qkv  # scores = q . k
    assert len(matmul_1.preds) == 2 and matmul_1.preds[1] == "matmul_0" and matmul_1.preds[0] in qkv  # probs . v
    assert graph.kernel("dense_3").preds == ("matmul_1",)  # output projection
    assert graph.kernel("dense_3").has_norm and graph.kernel("dense_5").has_norm


def test_decoder_lm_kernels(model):
    _, traced, graph = model("decoder_lm")
    embed = graph.kernels[0]
    assert embed.name == "embed_0" and embed.batch == 2
    assert embed.ops[:5] == ("lt", "add", "select_n", "broadcast_in_dim", "gather")  # index math is the prologue
    assert {traced.param_paths[p] for p in embed.params} >= {"params/Embed_0/embedding", "params/pos"}
    assert embed.source.endswith(f"model_zoo.py:{_line_in_models('nn.Embed(self.vocab')}")
    scores = graph.kernel("matmul_0")
    assert "iota" in scores.ops and scores.has_softmax  # the causal mask is built where it is used
    head = graph.kernels[-1]
    assert head.name == "dense_6" and head.outputs[0].aval.shape == (2, 6, 13)


def test_rmsnorm_before_any_matmul_is_an_elementwise_kernel(model):
    _, _, graph = model("rmsnorm")
    norm = graph.kernel("elementwise_0")
    assert norm.anchor is None and norm.has_norm and norm.batch == 3
    assert "dot_general" not in norm.ops and len(norm.params) == 1
    assert graph.kernel("dense_1").preds == ("dense_0",) and graph.kernel("dense_1").ops[-1] == "add"  # residual


def test_scan_kernel_counts_every_step(model):
    case, _, graph = model("rnn")
    scan = graph.kernel("scan_0")
    t, b, d_in = case.inputs[0].shape
    h = case.params["wh"].shape[0]
    assert scan.counts[("fmac", "fp32", 8, 4)] == t * b * h * (d_in + h)
    assert scan.counts[("special", "fp32", 4, 4)] == t * b * h  # tanh
    # a step: x @ wx ([2, 8] @ [8, 10]: 8 x 2 instructions along the hidden axis), h @ wh (10 x 2), two adds, tanh (16)
    assert scan.counts[("instr",)] == t * (8 * 2 + 10 * 2 + 1 + 1 + 16)
    assert scan.counts[("ops",)] == t * 5
    assert "broadcast_in_dim" in scan.ops  # the zero initial state is built in the kernel that uses it


def test_tied_embedding_is_shared():
    def lm(params, tokens):
        x = params["emb"][tokens]
        return jnp.tanh(x) @ params["emb"].T

    traced = trace(lm, {"emb": jnp.ones((13, 8))}, jnp.zeros((2, 3), jnp.int32))
    graph = build_graph(traced)
    assert graph.names == ("embed_0", "dense_0")
    assert graph.param_owner == {0: "embed_0"} and graph.shared_params == {0: ("dense_0",)}
    assert graph.kernel("dense_0").ops[0] == "transpose"  # the weight's transpose joins its user


def test_no_anchor_program_is_one_elementwise_kernel():
    graph = build_graph(trace(lambda p, x: jnp.exp(x) * p, jnp.float32(2.0), jnp.ones(5)))
    assert graph.names == ("elementwise_0",) and graph.kernels[0].params == (0,)
    # exp: a special function's 16 instructions over 5 elements; the multiply by the scalar p (in a register) reads
    # one vector
    assert graph.kernels[0].counts == {
        ("special", "fp32", 4, 4): 5,
        ("alu", "fp32", 4, 4): 5,
        ("instr",): 16 + 1,
        ("ops",): 2,
    }


def test_dropout_and_cond_are_supported():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dropout(0.5, deterministic=False)(nn.Dense(10)(x))
            return jax.lax.cond(x.sum() > 0, jnp.tanh, lambda y: 2 * y, nn.Dense(4)(x))

    x = jnp.ones((3, 8))
    variables = jax.eval_shape(Net().init, jax.random.key(0), x)
    fn = lambda v, x, key: Net().apply(v, x, rngs={"dropout": key})
    graph = build_graph(trace(fn, variables, x, jax.random.key(1)))
    assert graph.names == ("dense_0", "dense_1")
    assert "random_bits" in graph.kernels[0].ops and arithmetic(graph.kernels[0].counts)[("alu", "int")] > 0
    assert "cond" in graph.kernels[1].ops


def test_kernel_lookup_error_suggests_names(model):
    _, _, graph = model("mlp")
    assert graph.kernel("dense_1") is graph.kernels[1]
    with pytest.raises(KeyError, match="Perhaps you meant dense_"):
        graph.kernel("dense_9")


def test_data_structures_are_frozen(model):
    _, _, graph = model("mlp")
    assert isinstance(graph, Graph) and isinstance(graph.kernels[0], Kernel)
    with pytest.raises(AttributeError):
        graph.kernels[0].name = "x"  # type: ignore[misc]
    hash(graph.kernels[0])
    assert "dense_2" in graph.summary()


def test_unsupported_primitive_names_it_and_the_users_line():
    def fn(params, x):
        return jnp.fft.fft(x @ params).real  # unsupported: fft

    with pytest.raises(UnsupportedOpError) as info:
        build_graph(trace(fn, jnp.ones((4, 4)), jnp.ones((2, 4))))
    err = info.value
    assert isinstance(err, wafer.kernel.UnsupportedPrimitiveError) and isinstance(err, NotImplementedError)
    assert err.primitive == "fft"
    assert err.source.endswith(f"test_graph.py:{_line_in(__file__, 'unsupported: fft')}")
    assert str(err).startswith("compiler: primitive 'fft' is not supported (at ")
    assert (
        "test_graph.py:" in str(err)
        and "dot_general" in str(err)
        and err.supported == tuple(sorted(SUPPORTED_PRIMITIVES))
    )


def test_unsupported_inside_a_library_call_and_a_loop_body():
    def chol(params, x):
        return jax.lax.scan(lambda c, a: (c, jnp.linalg.cholesky(a @ a.T + params)), 0.0, x)[1]  # cholesky here

    with pytest.raises(UnsupportedOpError, match="cholesky") as info:
        build_graph(trace(chol, jnp.eye(3), jnp.ones((2, 3, 3))))
    assert info.value.source.endswith(f"test_graph.py:{_line_in(__file__, 'cholesky here')}")

    def loop(params, x):
        return jax.lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c * params, x)

    with pytest.raises(UnsupportedOpError, match="use lax.scan"):
        build_graph(trace(loop, jnp.float32(2.0), jnp.ones(3)))


def test_bf16_counts_mixed_precision():
    w = jnp.ones((8, 10), jnp.bfloat16)
    fn = lambda w, x: jnp.dot(x, w, preferred_element_type=jnp.float32)
    graph = build_graph(trace(fn, w, jnp.ones((4, 8), jnp.bfloat16)))
    # 16-bit operands accumulated in fp32: along the 10 output columns (8 x 4 = 32 instructions, fewer than 4 x 10 dot
    # products), each reading a 2-byte weight row and the 4-byte accumulator and writing the accumulator
    assert graph.kernels[0].counts == {("fmac", "mixed", 2 + 4, 4): 4 * 8 * 10, ("instr",): 8 * 4, ("ops",): 1}


def test_counts_match_the_machine_on_a_whole_kernel():
    """A kernel's counts are the machine's counts of the same equations."""
    fn = lambda p, x: jax.nn.relu(x @ p["w"] + p["b"]) * 3.0 + 1.0
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
    graph = build_graph(trace(fn, params, jnp.ones((4, 6))))
    machine = wafer.kernel.count(lambda x: fn(params, x), jax.ShapeDtypeStruct((4, 6), np.float32))
    assert machine.pop(("task",)) == 1  # the machine runs it as one task; a kernel's counts are its instructions
    assert graph.kernels[0].counts == machine


def _line_in(path: str, marker: str) -> int:
    with open(path) as f:
        lines = [i for i, line in enumerate(f, 1) if marker in line and "_line_in(" not in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def _line_in_models(marker: str) -> int:
    import model_zoo as models

    return _line_in(models.__file__, marker)

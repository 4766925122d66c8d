"""Two wafers in two processes: data-parallel training over `jax.distributed`, checked bit for bit against one process.

Several CS-2 systems train one model data-parallel; here each system's wafer is emulated by its own process, and the
two processes form one JAX program with `jax.distributed.initialize` (coordinator on localhost). Their devices make
one mesh with a "wafer" axis (`compiler.cluster_mesh`), so each process holds one wafer's state, and the gradient
all-reduce between the wafers is an XLA collective between the processes (gloo on CPU).

    python experiments/cluster_distributed.py             # launches 2 processes, then checks them against 1
    python experiments/cluster_distributed.py --mode weight_streaming --steps 5

The launcher trains the same 2-wafer program in its own process (both wafers on one device) and exits non-zero
unless the distributed run's losses and params equal it exactly. On a real cluster, run the worker part on every
host with the coordinator's address instead (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

WAFERS = 2


def problem():
    """A small MLP classifier, its params and a global batch source (numpy; the same in every process)."""
    import flax.linen as nn
    import jax
    import optax

    import compiler

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 12)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int32)
    net = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(10)])
    shapes = jax.eval_shape(net.init, jax.random.key(0), x[:16])
    params = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, batch["x"]), batch["y"]).mean()

    return loss_fn, params, compiler.Batches.from_arrays(x, y, 16, seed=1)


def train(mode: str, steps: int, mesh=None):
    """(losses, params as numpy leaves) of `steps` steps of the 2-wafer program on `mesh` (None: one device)."""
    import jax
    import optax
    from jax.experimental import multihost_utils

    import compiler
    import wafer

    loss_fn, params, batches = problem()
    tx = compiler.compile_train(
        loss_fn,
        params,
        batches.batch(0),
        optax.adam(0.05),
        spec=wafer.WaferSpec.mini(8, 8),
        mode=mode,
        wafers=WAFERS,
        mesh=mesh,
    )
    state, losses = tx.init(params), []
    for i in range(steps):
        state, metrics = tx.step(state, batches.batch(i))
        losses.append(float(metrics["loss"]))  # replicated on every process
    if mesh is not None:  # every process gets the whole state back (each held its own wafer)
        state = multihost_utils.process_allgather(state, tiled=True)
    return np.array(losses), [np.asarray(x) for x in jax.tree_util.tree_leaves(tx.read_params(state))]


def worker(args) -> int:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.processes, process_id=args.process_id
    )
    import compiler

    mesh = compiler.cluster_mesh(WAFERS)  # the devices of every process
    losses, leaves = train(args.mode, args.steps, mesh)
    if jax.process_index() == 0:
        np.savez(args.out, losses=losses, **{f"p{i}": x for i, x in enumerate(leaves)})
    jax.distributed.shutdown()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args) -> int:
    out = os.path.join(tempfile.mkdtemp(), "distributed.npz")
    coordinator = f"localhost:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", args.mode, "--steps", str(args.steps)]
    cmd += ["--coordinator", coordinator, "--processes", str(WAFERS), "--out", out]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env) for i in range(WAFERS)]
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if any(codes):
        print(f"error: worker processes exited with {codes}", file=sys.stderr)
        return 2
    got = np.load(out)
    losses, leaves = train(args.mode, args.steps)  # both wafers in this one process
    same_losses = np.array_equal(got["losses"], losses)
    same_params = all(np.array_equal(got[f"p{i}"], x) for i, x in enumerate(leaves))
    print(f"{WAFERS} wafers in {WAFERS} processes (jax.distributed, {args.mode}), {args.steps} steps:")
    print(f"  losses     {np.array2string(got['losses'], precision=6)}")
    print(f"  one process {np.array2string(losses, precision=6)}")
    print(f"  bit-identical: losses {same_losses}, params {same_params}")
    return 0 if same_losses and same_params else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("pipelined", "weight_streaming"), default="pipelined")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds the workers may take (default 300)")
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return worker(args) if args.coordinator else launch(args)


if __name__ == "__main__":
    sys.exit(main())

"""host: what the CS-2's CPU cluster runs beside the wafer.

fit.py: the training loop `compiler.fit`, orbax checkpoints and the non-finite-loss stop (was compiler/host.py;
the names it exported are re-exported here, so `from compiler.host import fit` keeps working).
estimator.py: `compiler.Estimator`, the TF / Cerebras Estimator programming model over `compile_train` and `fit`.
"""

from compiler.host.estimator import Estimator, EstimatorSpec, ModeKeys
from compiler.host.fit import NonFiniteLossError, fit, latest_checkpoint, restore_checkpoint, save_checkpoint

__all__ = [
    "Estimator",
    "EstimatorSpec",
    "ModeKeys",
    "NonFiniteLossError",
    "fit",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

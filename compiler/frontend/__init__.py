"""frontend: programs of other frameworks as plain JAX functions and params (the compiler's entry side).

    fn, params = compiler.from_torch(module)          # torch.nn.Module, eval or train mode (torch_import.py)
    fn, params = compiler.from_keras(model)           # Keras 3 on the JAX backend (keras_import.py)
    fn, params = compiler.from_tf(tf_fn, *inputs)     # tf.function or TF-backend Keras model (tf_import.py)
    compiler.to_torch(module, params); compiler.to_keras(model, params)   # trained params back

Each framework is an optional extra; a missing one raises `MissingExtraError` naming the extra and the pip command.
frameworks.py holds what they share: the dispatcher `trace()` uses and `stateful` for training with state.
"""

from compiler.frontend.frameworks import MissingExtraError, as_function, stateful
from compiler.frontend.keras_import import from_keras, to_keras
from compiler.frontend.tf_import import from_tf
from compiler.frontend.torch_import import UnsupportedTorchOpError, from_torch, to_torch

__all__ = [
    "MissingExtraError",
    "UnsupportedTorchOpError",
    "as_function",
    "stateful",
    "from_torch",
    "to_torch",
    "from_keras",
    "to_keras",
    "from_tf",
]

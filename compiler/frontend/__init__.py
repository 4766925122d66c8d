"""The front end: a user's program as a flat jaxpr (trace.py), under a precision policy (precision.py), grouped
into kernels (graph.py). What comes out, a `Traced` program and its `Graph`, is what the plan passes read.

Programs of other frameworks enter as plain JAX functions and params through the importers: torch_import.py
(`from_torch`, `to_torch`: torch.export -> core ATen -> lax), keras_import.py (`from_keras`, `to_keras`: Keras 3's
`stateless_call`), tf_import.py (`from_tf`: tf2jax); frameworks.py holds what they share (the dispatcher `trace()`
uses for a torch module or Keras model, `MissingExtraError`, and `stateful` for training with state).
docs/frameworks.md says what is and is not supported."""

"""Framework importer tests need Keras on the JAX backend: chosen before keras is first imported."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

"""Factories for `wafer compile FILE:FACTORY` returning a torch module or a Keras model with its inputs."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def cnn(batch: int = 4):
    """A torch CNN with BatchNorm and max pooling, in eval mode, and a random batch."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    ).eval()
    return m, torch.randn(batch, 3, 8, 8)


def kmlp():
    """A Keras MLP and a random batch."""
    import keras

    inp = keras.Input((12,))
    m = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Dense(16, activation="relu")(inp)))
    return m, np.random.default_rng(0).normal(size=(8, 12)).astype("float32")

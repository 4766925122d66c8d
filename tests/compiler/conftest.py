"""Shared fixtures for compiler tests: the small models of `tests/model_zoo.py`, traced and grouped once per session."""

from __future__ import annotations

import pytest
from model_zoo import MODELS, Case

from compiler.frontend.graph import Graph, build_graph
from compiler.frontend.trace import Traced, trace


@pytest.fixture(scope="session")
def model():
    """`model(name) -> (Case, Traced, Graph)` for a name of `model_zoo.MODELS`, built once per session."""
    cache: dict[str, tuple[Case, Traced, Graph]] = {}

    def get(name: str) -> tuple[Case, Traced, Graph]:
        if name not in cache:
            case = MODELS[name]()
            traced = trace(*case.trace_args())
            cache[name] = (case, traced, build_graph(traced))
        return cache[name]

    return get

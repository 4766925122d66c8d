"""The front end: a user's program as a flat jaxpr (trace.py), under a precision policy (precision.py), grouped
into kernels (graph.py). What comes out, a `Traced` program and its `Graph`, is what the plan passes read."""

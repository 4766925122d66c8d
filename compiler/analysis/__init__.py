"""Research on a plan's schedule: the differentiable cost model (costmodel.py: the schedule on a relaxed layout),
sweeps and what-ifs (sweep.py), placement search (search.py)."""

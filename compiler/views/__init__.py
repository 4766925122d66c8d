"""Views of a compiled program: the compile report (report.py: `build_report`, `estimate`), pictures of the wafer
(plots.py), of sweeps (sweep_plots.py) and the Perfetto trace of its schedule (trace_export.py). They draw the
schedule's figures (compiler/schedule.py); none computes timing of its own."""

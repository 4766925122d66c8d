"""Running on the emulated wafer: the `Program` type (program.py), inference (infer.py: `compile`, the fast path;
percore.py: the literal per-core path) and training (train.py: `compile_train`, pipelined and weight-streaming
builders)."""

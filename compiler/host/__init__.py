"""The host side, the CPU cluster's part: the input pipeline (data.py: `Batches`, prefetching) and the training
loop with checkpoints (fit.py: `fit`)."""

"""The host side, the CPU cluster's part: the input pipeline (data.py: `Batches`, prefetching), the training
loop with checkpoints (fit.py: `fit`), and the TF / Cerebras Estimator programming model over them
(estimator.py: `Estimator`, `EstimatorSpec`, `ModeKeys`)."""

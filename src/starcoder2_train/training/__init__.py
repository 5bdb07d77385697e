"""Training: transformers' Trainer with this project's loss, throughput figures and process handling.

`loss` (chunked cross-entropy: the fp32 logits of the whole batch never exist), `trainer` (PretrainingTrainer:
chunked loss, partial activation checkpointing, compiled layers), `throughput` (tokens/s, TFLOP/s, MFU, peak
memory and data wait on every log line) and `distributed` (DeepSpeed on CPUs, clean shutdown). May import
`configs`, `data/` and `model/`.
"""

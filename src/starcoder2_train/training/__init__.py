"""Training: transformers' Trainer with this project's loss, throughput figures and process handling.

`loss` (the training-loss kernels: fused linear + cross-entropy, chunked, transformers'; none keeps the fp32
logits of the whole batch), `float8` (torchao float8 linears), `trainer` (PretrainingTrainer: the loss kernel,
float8, partial activation checkpointing, compiled layers, no host syncs of its own), `precision` (what precision
a run really got from DeepSpeed), `throughput` (tokens/s, TFLOP/s, MFU, peak memory, data wait and GPU idle time
on every log line), `dry_run` (`--dry_run true` and `gradient_checkpointing_layers: auto`: the memory plan
read from the DeepSpeed JSON and the recipe), `checkpoints` (checkpoints staged, verified, marked complete and
renamed; the newest complete one picked on restart; the run's recipe checked against it), `preemption`
(SIGTERM/SIGUSR1: every rank stops at the same step, saves and exits for a requeue), `distributed`
(DeepSpeed on CPUs, clean shutdown) and `cpu_fallback` (what a GPU recipe's GPU-only keys become on a machine
without CUDA, decided when the recipe is read). May import
`configs`, `data/` and `model/`.
"""

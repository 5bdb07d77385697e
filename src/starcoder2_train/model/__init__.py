"""The model: StarCoder2 as transformers builds it, and what it costs.

`presets` (the released configs, vocabulary sizing, overrides), `attention` (the `sdpa_varlen` and
`sdpa_blocked` kernels that keep packed documents apart), `factory` (attention choice, creating or loading the
model, checking it against the tokenizer and the data), `flops` (model FLOPs per token, peak FLOP/s),
`memory` (peak bytes per GPU for a precision, ZeRO stage, attention, loss and checkpointing plan). May import
`configs` and `data/` (special tokens, document boundaries), never training/ or later.
"""

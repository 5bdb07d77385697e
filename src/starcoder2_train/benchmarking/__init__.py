"""Measuring speed: what scripts/benchmark.py, scripts/device_check.py and scripts/benchmark_data.py run.

In the order a measurement goes: `documents` (synthetic documents, token files, the pipeline's rows), `paths`
(this project's training path and the baselines transformers offers: plain, flattening), `runner` (the
benchmark's parent: one process per path and repeat, via `processes`), `child` (one path in one process),
`steps` (its warm-up and timed Trainer steps), `hardware_flops` (MFU, PaLM MFU and hardware FLOPs counting
recomputation), `aggregate` (median and min–max over the processes), `profile` (device time by kernel class),
`gemm` (the GEMM ceiling), `kernels` and `loss_kernels` (the device check's attention and loss kernels),
`device_cases` (the device check's plan and memory_peaks.json), `isolated` (a step in its own process under a
time limit), `data_pipeline`, `token_store` and `download` (the data benchmarks), `report` (the printed
tables) and `provenance` (the commit, date, command and machine every benchmark JSON records). It may import
anything in the package; nothing in the package imports it: only the scripts and the tests do.
"""

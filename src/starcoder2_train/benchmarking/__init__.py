"""Measuring speed: what scripts/benchmark.py, scripts/device_check.py and scripts/benchmark_data.py run.

In the order a measurement goes: `documents` (synthetic documents, token files, the pipeline's rows), `paths`
(this project's training path and the plain transformers one), `steps` (timed Trainer steps of a path),
`kernels` (the device check's attention kernels), `isolated` (a step in its own process under a time limit),
`data_pipeline` (the data benchmark), `report` (the printed tables) and `provenance` (the commit, date,
command and machine every benchmark JSON records). It may import anything in the package; nothing in the
package imports it: only the scripts and the tests do.
"""

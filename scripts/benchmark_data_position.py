"""Restart cost of the data position: seconds from a resumed run's dataloader to its first batch, at resume steps
20 and 400 (and larger, for the slope), with the Trainer's skipping (accelerate's `skip_first_batches`, which walks
every trained micro-batch through its SkipBatchSampler) beside this project's WindowSampler started at the
recorded position (training/data_position.py); extrapolated to the last step of the StarCoder2-3B recipe.

The shape is the 3B recipe's on rank 0 of 160 processes: per_device_train_batch_size 2, gradient_accumulation_steps
2 (640 windows a step), 1.2M steps. The dataset is a stand-in of that length whose windows cost nothing to read,
so the figures are the sampler's and accelerate's own (a real run adds the first batch's read to both sides).

    .venv/bin/python scripts/benchmark_data_position.py [--steps 20 400 4000 40000] [--processes 160]
"""

import json
import platform
import subprocess
import time

import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches

from starcoder2_train.cli import ScriptParser, run_script
from starcoder2_train.training.data_position import WindowSampler


class Windows(torch.utils.data.Dataset):
    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def first_batch_seconds(step: int, processes: int, batch: int, accumulation: int, total_steps: int, ours: bool):
    windows = batch * accumulation * processes
    dataset = Windows(total_steps * windows)
    sampler = WindowSampler(len(dataset), start=step * windows) if ours else WindowSampler(len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler)
    loader = prepare_data_loader(loader, num_processes=processes, process_index=0, put_on_device=False)
    start = time.perf_counter()
    if not ours:
        loader = skip_first_batches(loader, step * accumulation)  # what Trainer.get_resumed_dataloader does
    first = next(iter(loader))
    seconds = time.perf_counter() - start
    assert int(first[0]) == step * windows, (int(first[0]), step * windows)  # both resume at the same window
    return seconds


def main(argv=None):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 400, 4000, 40000])
    parser.add_argument("--processes", type=int, default=160)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--total_steps", type=int, default=1_200_000)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for step in args.steps:
        shape = (step, args.processes, args.batch, args.accumulation, args.total_steps)
        skipping = first_batch_seconds(*shape, ours=False)
        position = first_batch_seconds(*shape, ours=True)
        rows.append({"step": step, "skipping_s": skipping, "position_s": position})
    slope = (rows[-1]["skipping_s"] - rows[0]["skipping_s"]) / max(1, rows[-1]["step"] - rows[0]["step"])
    extrapolated = rows[0]["skipping_s"] + slope * (args.total_steps - rows[0]["step"])
    report = {
        "commit": commit,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "shape": vars(args),
        "rows": rows,
        "skipping_seconds_per_step": slope,
        "skipping_extrapolated_s": extrapolated,
        "position_at_last_step_s": first_batch_seconds(args.total_steps - 1, *shape[1:], ours=True),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)

"""A real two-machine launch on this machine: two `accelerate launch` commands, as two nodes would run them
(`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`), one process each, DeepSpeed ZeRO-2 over gloo.
Both machines train: each rank logs its own windows (different ones, together the 1-process run's batch), both
end with the same weights, and the losses are the 1-process run's."""

import json
import socket
import subprocess
import sys

import pytest
from conftest import LAUNCH_ENV
from test_preemption import ROOT, losses, one_process, run, setup, trained_windows  # noqa: F401 - fixtures

deepspeed = pytest.importorskip("deepspeed")


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def node_command(recipe, driver, out, machine_rank: int, port: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_machines", "2", "--num_processes", "2"]
    command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(port), str(driver), str(recipe)]
    return command + ["--per_device_train_batch_size", "2", "--output_dir", str(out), "--max_steps", "4"]


@pytest.mark.slow
def test_two_machines_over_loopback_both_train_on_their_own_windows_to_the_same_weights(setup):  # noqa: F811
    root, recipe, driver = setup
    reference = root / "two-nodes-reference"
    run(one_process(recipe, driver, reference) + ["--max_steps", "4"], WINDOW_LOG=str(root / "windows-1-node"))
    out, windows, port = root / "two-nodes", root / "windows-2-nodes", free_port()
    env = dict(LAUNCH_ENV, WINDOW_LOG=str(windows))
    nodes = [
        subprocess.Popen(
            node_command(recipe, driver, out, rank, port),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n=====\n".join(text[-4000:] for text in outputs)
    # Each machine ran its own rank: machine 1's process is global rank 1.
    assert "STEP 4 RANK 0" in outputs[0] and "STEP 4 RANK 1" in outputs[1]
    per_rank = {}
    for rank in (0, 1):
        lines = (windows / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank[rank] = [json.loads(line)["windows"] for line in lines]
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    for step in range(4):  # different windows on the two machines, together the one-process step's
        assert not set(per_rank[0][step]) & set(per_rank[1][step])
        assert sorted(per_rank[0][step] + per_rank[1][step]) == trained_windows(root / "windows-1-node")[step + 1]
    weights = [(windows / f"weights{rank}.txt").read_text() for rank in (0, 1)]
    assert weights[0] == weights[1]  # the same weights after the last step on both machines
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)

"""The processes of one benchmark: each path and repeat is a process of its own, started by benchmark.py.

A path measured in its own process starts with the whole device (no memory left over by another path, no
compilation cache of another), so that repeats alternate cleanly. `child_environment` gives each one what a
one-process distributed run needs when the recipe trains through DeepSpeed (MASTER_ADDR, a free MASTER_PORT,
RANK, LOCAL_RANK and WORLD_SIZE, where not already set) and, on a CPU, DeepSpeed's CPU accelerator with no
CUDA device visible (as tests/test_distributed.py runs DeepSpeed on CPUs). `run_child` runs one and reads the
JSON it writes; a child that fails, is killed at its time limit or writes nothing is recorded as an error.
"""

import json
import os
import socket
import sys
import time

from starcoder2_train.benchmarking.isolated import run_limited
from starcoder2_train.cli import parse_overrides


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS's choice), for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def recipe_keys(recipe_words: list[str]) -> dict:
    """`--key value` / `--key=value` recipe words as {key: last value}, read with the scripts' one grammar
    (cli.parse_overrides, standard library only: the parent does not import transformers' Trainer; the children
    parse the words for real with RecipeParser)."""
    return {
        key: value[-1] if isinstance(value, list) else value for key, value in parse_overrides(recipe_words).items()
    }


def uses_deepspeed(recipe_words: list[str]) -> bool:
    return bool(recipe_keys(recipe_words).get("deepspeed"))


def on_cpu(recipe_words: list[str]) -> bool:
    """Whether the paths train on the CPU: no CUDA here, or use_cpu given."""
    import torch

    use_cpu = str(recipe_keys(recipe_words).get("use_cpu", "false")).lower() in ("true", "1", "yes")
    return use_cpu or not torch.cuda.is_available()


def child_environment(deepspeed: bool, cpu: bool, base: dict | None = None) -> dict:
    """The environment of one path's process (see the module's docstring)."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    if deepspeed:
        defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        for key, value in defaults.items():
            env.setdefault(key, value)
        env.setdefault("MASTER_PORT", str(free_port()))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_child(script: str, words: list[str], output: str, env: dict, limit: float | None) -> dict:
    """Run `script WORDS --output OUTPUT` in its own process; the JSON it wrote, else {"result": {"error"}}.
    The JSON carries the child's status and seconds."""
    if os.path.exists(output):
        os.remove(output)
    command = [sys.executable, script, *words, "--output", output]
    print(f"\n--- $ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    status = run_limited(command, limit, env=env, new_session=False)  # killed with the benchmark, if it is
    seconds = round(time.perf_counter() - start, 1)
    if os.path.isfile(output):
        with open(output) as handle:
            written = json.load(handle)
    else:
        written = {"result": {"error": f"no result: the process ended with {status}"}}
    written.update(status=status, process_seconds=seconds)
    return written

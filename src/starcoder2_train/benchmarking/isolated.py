"""Steps that run in a process of their own under a time limit, as the device check runs them.

The isolation is deliberate: an out-of-memory, a crash or a hang in one step is recorded as that step's
status, and the next step still runs with the whole device to itself.
"""

import json
import os
import subprocess
import sys
import time


def run_limited(command: list[str], limit: float) -> str:
    """Run `command`, killed after `limit` seconds; "exit N" or "killed after L s"."""
    try:
        completed = subprocess.run(command, timeout=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return f"killed after {limit:.0f} s"
    return f"exit {completed.returncode}"


def run_benchmark(script: str, name: str, words: list[str], limit: float, output_dir: str) -> dict:
    """Run the training benchmark `script` in its own process under `limit` seconds; its JSON report, or what
    went wrong, with the process's status and seconds."""
    output = os.path.join(output_dir, f"benchmark-{name}.json")
    command = [sys.executable, script, "--label", name, "--output", output, *words]
    print(f"\n=== {name} (limit {limit:.0f} s)\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    status = run_limited(command, limit)
    seconds = time.perf_counter() - start
    if os.path.isfile(output):
        with open(output) as handle:
            report = json.load(handle)
    else:
        report = {"label": name, "results": {}, "error": status}
    report.update(status=status, seconds=round(seconds, 1))
    return report

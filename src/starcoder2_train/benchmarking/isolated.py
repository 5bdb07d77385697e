"""Steps that run in a process of their own under a time limit, as the device check and benchmark.py run them.

The isolation is deliberate: an out-of-memory, a crash or a hang in one step is recorded as that step's
status, and the next step still runs with the whole device to itself. A step is started in a new process
session, and at its time limit that whole session's group is killed (its own children too: the path
processes a benchmark starts stay in its group, and the data loader's workers), so nothing of it keeps
holding the device.
"""

import json
import os
import signal
import subprocess
import sys
import time


def exit_on_sigterm() -> None:
    """Turn SIGTERM (`timeout`, a job scheduler) into SystemExit, so that `run_limited` kills its step's
    process group on the way out instead of leaving it running on the device."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_limited(command: list[str], limit: float | None, env: dict | None = None, new_session: bool = True) -> str:
    """Run `command`, killed after `limit` seconds if given; "exit N" or "killed after L s".

    new_session: the command leads a process group of its own, and the whole group is killed at the limit (or
    when this process is interrupted). Without, only the command is killed, and it stays in this process's
    group, so that a step killed from above takes it along (benchmark.py's path processes)."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, start_new_session=new_session)

    def kill() -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL) if new_session else process.kill()  # what this call started
        except ProcessLookupError:
            pass
        process.wait()

    try:
        return f"exit {process.wait(timeout=limit)}"
    except subprocess.TimeoutExpired:
        kill()
        return f"killed after {limit:.0f} s"
    except BaseException:  # interrupted (SIGTERM, Ctrl-C): do not leave the step running
        kill()
        raise


def run_benchmark(script: str, name: str, words: list[str], limit: float, output_dir: str) -> dict:
    """Run the training benchmark `script` in its own process under `limit` seconds; its JSON report, or what
    went wrong, with the process's status and seconds."""
    output = os.path.join(output_dir, f"benchmark-{name}.json")
    if os.path.exists(output):
        os.remove(output)
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

"""close_process_group(exit_code) (training/distributed.py): a multi-process run ends there with that status,
after the work Python's shutdown would do (atexit handlers, buffered output), and before its finalization."""

import subprocess
import sys

import pytest
from conftest import LAUNCH_ENV

from starcoder2_train.training.distributed import close_process_group

RANK_SCRIPT = """
import atexit, os, sys
from concurrent.futures import ThreadPoolExecutor
import torch.distributed as dist
from starcoder2_train.training.distributed import close_process_group

dist.init_process_group("gloo")
rank = dist.get_rank()
pool = ThreadPoolExecutor(2)  # left open, as a save's writer pool is: its idle workers must be woken, not joined
pool.submit(print, f"rank {{rank}} pool", end=" ").result()
atexit.register(lambda: open(os.path.join({out!r}, f"atexit{{rank}}"), "w").write("ran"))
print(f"rank {{rank}} buffered", end="")  # a pipe: block-buffered, written only if flushed before the exit
close_process_group(exit_code=75)
print(f"rank {{rank}} went on after close_process_group", flush=True)
"""


def test_without_a_process_group_it_returns():
    close_process_group(exit_code=0)  # pytest itself goes on: nothing to close, no exit


@pytest.mark.slow
def test_two_ranks_end_with_the_exit_code_after_the_atexit_handlers_and_their_buffered_output(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, env=LAUNCH_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "exitcode  : 75" in result.stderr, result.stderr[-3000:]
    assert "went on" not in result.stdout
    assert "rank 0 buffered" in result.stdout and "rank 1 buffered" in result.stdout, result.stdout
    assert sorted(path.name for path in tmp_path.glob("atexit*")) == ["atexit0", "atexit1"]

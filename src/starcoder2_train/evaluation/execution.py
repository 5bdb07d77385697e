"""Run untrusted programs (model-written code) each in its own limited, throw-away process.

Executing what a model wrote is needed for pass@k and dangerous: it is refused unless the user sets
`HF_ALLOW_CODE_EVAL=1` (the variable the `evaluate` library's code_eval uses).

What one program gets, and what holds it (the child side is starcoder2_train/evaluation/sandbox.py):
- its own `python -I -B` process in its own session, started with a minimal environment (no tokens,
  no PYTHONPATH), HOME and TMPDIR inside a fresh temporary working directory, which is deleted afterwards;
- time: RLIMIT_CPU, and a wall-clock timeout after which the whole process group is killed;
- memory: RLIMIT_AS (address space); disk: RLIMIT_FSIZE (largest file it may write; stdout and stderr go
  to files, so an endless print is bounded too); processes: RLIMIT_NPROC = 0 (no fork; the kernel does not
  apply this limit to root);
- files: writes only beneath the working directory; reads and folder listings only there and in the Python
  installation and system library folders (`sandbox.readable_paths()`; sandbox.py's docstring lists them):
  not HOME's Hub token or cloud credentials, not /etc/shadow, not /proc (another process's environment).
  * Landlock (Linux >= 5.13, unprivileged, kernel-enforced): the process and anything it starts may create,
    write, truncate, rename or delete files only beneath its working directory (and write /dev/null), read
    only as above, and execute no file. This holds whatever the program does (ctypes, raw syscalls). With
    Landlock ABI >= 4 it may not bind or connect TCP sockets; with ABI >= 6 it may not signal processes
    outside the sandbox.
  * a Python guard: open/os/pathlib/shutil writes outside the working directory and reads or listings outside
    the readable paths raise PermissionError, and os.system, subprocess, fork, exec, kill and ctypes are
    disabled. It catches the ordinary ways, gives clear errors, and is the only barrier where Landlock is
    missing; it is not a security boundary.

Without Landlock (`landlock="auto"`, the default) programs still run, under the Python guard alone, after one
warning that says so; `landlock="require"` refuses instead. Why not refuse by default: the user has opted in
(HF_ALLOW_CODE_EVAL=1, whose message asks for a container or VM without credentials), and the machines where
Landlock is missing are mostly those containers (Docker's default seccomp profile) and older cluster kernels
(RHEL 8's 4.18), where refusing would leave only `landlock="off"` or the harness's own unisolated `exec`.

What is NOT contained: that a path exists and its size (stat and readlink are not Landlock rights), UDP and
Unix sockets, and anything on a kernel without Landlock beyond the Python guard. Run evaluations of untrusted
models in a container or VM that holds no credentials.
"""

import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from starcoder2_train.evaluation import sandbox
from starcoder2_train.evaluation.sandbox import landlock_abi, readable_paths
from starcoder2_train.progress import progress

logger = logging.getLogger(__name__)

ALLOW_VARIABLE = "HF_ALLOW_CODE_EVAL"
ISOLATION_CHOICES = ("auto", "require", "off")


class CodeExecutionNotAllowed(PermissionError):
    """Executing model-generated code was not enabled by the user."""


def require_code_execution_allowed() -> None:
    """Raise CodeExecutionNotAllowed unless HF_ALLOW_CODE_EVAL=1."""
    if os.environ.get(ALLOW_VARIABLE) != "1":
        raise CodeExecutionNotAllowed(
            f"Executing model-generated code is disabled. It runs programs a model wrote on this machine: "
            f"they are sandboxed (see starcoder2_train/evaluation/execution.py for what is and is not contained; "
            f"without Landlock in the kernel they can read your files). Prefer a container or VM without "
            f"credentials, then enable it with "
            f"`export {ALLOW_VARIABLE}=1`."
        )


@dataclasses.dataclass(frozen=True)
class ExecutionLimits:
    """Limits applied to each program."""

    timeout_s: float = 3.0  # wall-clock seconds before the process group is killed
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space of the process
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write (stdout/stderr included)
    max_processes: int | None = 0  # RLIMIT_NPROC; 0 forbids fork (ignored by the kernel for root); None: unset
    landlock: str = "auto"  # kernel write isolation: auto (when the kernel has it), require, off
    python_guard: bool = True  # the in-process guard against writes, subprocesses and ctypes

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_bytes <= 0 or self.file_size_bytes <= 0:
            raise ValueError("ExecutionLimits: timeout_s, memory_bytes and file_size_bytes must be positive.")
        if self.landlock not in ISOLATION_CHOICES:
            raise ValueError(f"ExecutionLimits.landlock: {self.landlock!r} is not one of {ISOLATION_CHOICES}.")


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    passed: bool  # ran to its end (exit status 0) within the limits
    result: str  # "passed", "timed out", "failed: <last line of stderr>", ...
    returncode: int | None
    duration_s: float
    stdout: str  # last few KiB
    stderr: str


def _tail(path: str, size: int = 4096) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _remove_tree(path: str) -> None:
    """Delete a working directory even where the program made parts of it read-only."""

    def make_writable_and_retry(function, failed_path, _):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


_warned_without_landlock = False


def _use_landlock(limits: ExecutionLimits) -> bool:
    global _warned_without_landlock
    if limits.landlock == "off":
        return False
    if landlock_abi() is not None:
        return True
    if limits.landlock == "require":
        raise RuntimeError(
            "ExecutionLimits.landlock='require' but this kernel has no Landlock (Linux >= 5.13 "
            "with Landlock enabled). Run in a container/VM, or set landlock='auto' to rely on "
            "the Python guard alone."
        )
    if not _warned_without_landlock:
        logger.warning(
            "This kernel has no Landlock: reads of your files (Hub tokens, credentials), writes outside the "
            "sandbox's working directory and network connections by model-written programs are stopped only by a "
            "Python-level guard, which a determined program can get around. Run in a container or VM without "
            "credentials, or set ExecutionLimits(landlock='require') to refuse instead."
        )
        _warned_without_landlock = True
    return False


@functools.cache
def _readable_paths() -> list[str]:
    return readable_paths()  # the same for every program: found once per process


def run_program(
    program: str, limits: ExecutionLimits | None = None, *, tmp_root: str | None = None
) -> ExecutionResult:
    """Run one Python program in a sandboxed child process; see the module docstring for what that means.

    tmp_root: where the throw-away working directory is made (default: the system's temp dir).
    """
    require_code_execution_allowed()
    limits = limits or ExecutionLimits()
    settings = (
        max(1, int(limits.timeout_s + 0.999)),
        limits.memory_bytes,
        limits.file_size_bytes,
        -1 if limits.max_processes is None else limits.max_processes,
        int(_use_landlock(limits)),
        int(limits.python_guard),
    )
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="sc2-exec-", dir=tmp_root))
    try:
        os.makedirs(os.path.join(workdir, "tmp"))
        with open(os.path.join(workdir, "program.py"), "w") as handle:
            handle.write(program)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": os.path.join(workdir, "tmp"),
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONHASHSEED": "0",
        }
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        command = [sys.executable, "-I", "-B", os.path.abspath(sandbox.__file__), *map(str, settings), "program.py"]
        command += _readable_paths()
        start, timed_out = time.monotonic(), False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # also ends anything the program left running in its group
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
        duration = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
    finally:
        _remove_tree(workdir)
    code = process.returncode
    if code == sandbox.SETUP_FAILED_STATUS and sandbox.SETUP_FAILED in stderr:
        raise RuntimeError(f"The sandbox could not be set up, so no program can be judged: {stderr.strip()}")
    if timed_out:
        result = f"timed out after {limits.timeout_s:g} s"
    elif code == -signal.SIGXCPU:
        result = "timed out: CPU time limit"
    elif code == -signal.SIGXFSZ:
        result = "failed: wrote a file larger than the file size limit"
    elif code < 0:
        result = f"failed: killed by {signal.Signals(-code).name}"
    elif code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        result = f"failed: {lines[-1] if lines else f'exit status {code}'}"
    else:
        result = "passed"
    return ExecutionResult(result == "passed", result, code, duration, stdout, stderr)


def run_programs(
    programs: list[str],
    limits: ExecutionLimits | None = None,
    *,
    num_workers: int = 4,
    tmp_root: str | None = None,
    disable_progress: bool | None = None,
) -> list[ExecutionResult]:
    """Run many programs, `num_workers` at a time (threads that each wait on one child process); in order, with a
    progress bar of programs run (quiet off a terminal or with `disable_progress`)."""
    require_code_execution_allowed()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        running = pool.map(lambda program: run_program(program, limits, tmp_root=tmp_root), programs)
        bar = progress(running, desc="running programs", total=len(programs), unit="program", disable=disable_progress)
        return list(bar)

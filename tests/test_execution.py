"""Sandboxed execution: opt-in, limits, throw-away working directories, no writes outside them."""

import dataclasses
import os

import pytest

from starcoder2_train.evaluation.execution import CodeExecutionNotAllowed, ExecutionLimits, run_program, run_programs
from starcoder2_train.evaluation.sandbox import landlock_abi

LIMITS = ExecutionLimits(timeout_s=2.0, memory_bytes=256 << 20)
needs_landlock = pytest.mark.skipif(landlock_abi() is None, reason="this kernel has no Landlock")


@pytest.fixture(autouse=True)
def allowed(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


@pytest.fixture
def sandboxes(tmp_path):
    """Where the working directories are made; each test checks that it is left empty."""
    path = tmp_path / "sandboxes"
    path.mkdir()
    yield str(path)
    assert os.listdir(path) == [], "a working directory was left behind"


def test_refused_without_the_opt_in(monkeypatch, sandboxes):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(CodeExecutionNotAllowed, match="export HF_ALLOW_CODE_EVAL=1"):
        run_program("print(1)", tmp_root=sandboxes)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "true")  # only "1" enables it
    with pytest.raises(CodeExecutionNotAllowed):
        run_programs(["print(1)"], tmp_root=sandboxes)


def test_pass_fail_and_output(sandboxes):
    ok, failing, early_exit = run_programs(
        ["import sys\nprint('out')\nprint('err', file=sys.stderr)", "assert 1 + 1 == 3", "import sys\nsys.exit(0)"],
        LIMITS,
        num_workers=2,
        tmp_root=sandboxes,
    )
    assert ok.passed and ok.result == "passed" and ok.stdout == "out\n" and ok.stderr == "err\n"
    assert not failing.passed and failing.result == "failed: AssertionError"
    assert not early_exit.passed and "exit()" in early_exit.result  # leaving before the tests ran is no pass


def test_endless_loop_and_sleep_are_stopped(sandboxes):
    limits = dataclasses.replace(LIMITS, timeout_s=1.0)
    for program in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        result = run_program(program, limits, tmp_root=sandboxes)
        assert not result.passed and result.result.startswith("timed out"), result
        assert result.duration_s < 5


def test_unbounded_allocation_is_stopped(sandboxes):
    for program in ("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))", "x = bytearray(1 << 40)"):
        result = run_program(program, LIMITS, tmp_root=sandboxes)
        assert not result.passed and "MemoryError" in result.result, result


def test_endless_output_is_bounded(sandboxes):
    limits = dataclasses.replace(LIMITS, file_size_bytes=1 << 20)
    result = run_program("while True:\n    print('x' * 4096)", limits, tmp_root=sandboxes)
    assert not result.passed and "File too large" in result.result
    assert len(result.stdout) <= 4096


def test_working_directory_is_private_and_usable(sandboxes):
    program = """
import os, pathlib, tempfile
pathlib.Path("a/b").mkdir(parents=True)
pathlib.Path("a/b/c.txt").write_text("hello")
os.rename("a/b/c.txt", "a/d.txt")
with tempfile.NamedTemporaryFile(delete=False) as handle:
    handle.write(b"x")
assert open("a/d.txt").read() == "hello"
assert os.environ["HOME"] == os.getcwd() and handle.name.startswith(os.getcwd())
assert "HF_ALLOW_CODE_EVAL" not in os.environ  # the parent's environment does not leak in
print(os.getcwd())
"""
    first, second = run_programs([program, program], LIMITS, num_workers=2, tmp_root=sandboxes)
    assert first.passed and second.passed, (first.stderr, second.stderr)
    assert first.stdout != second.stdout  # each its own directory
    assert not os.path.exists(first.stdout.strip())


ESCAPES = {
    "open": "open({target!r}, 'w').write('x')",
    "append to existing": "open({existing!r}, 'a').write('x')",
    "os.open": "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "mkdir": "import os\nos.mkdir({target!r})",
    "rename out": "open('f', 'w').write('x')\nimport os\nos.rename('f', {target!r})",
    "delete existing": "import os\nos.remove({existing!r})",
    "shutil": "import shutil\nopen('f', 'w').write('x')\nshutil.copy('f', {target!r})",
    "symlink": "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    "relative path": "import os\nopen(os.path.relpath({target!r}), 'w').write('x')",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > ' + {target!r}])",
    "os.system": "import os\nos.system('echo x > ' + {target!r})",
    "ctypes": "import ctypes\nctypes.CDLL(None).creat({target!r}.encode(), 0o644)",
}


def check_nothing_escaped(outside, results):
    assert sorted(os.listdir(outside)) == ["existing.txt"], dict(zip(ESCAPES, results))
    assert (outside / "existing.txt").read_text() == "keep"


def escape_attempts(outside):
    (outside / "existing.txt").write_text("keep")
    fields = {"target": str(outside / "new"), "existing": str(outside / "existing.txt")}
    return [program.format(**fields) for program in ESCAPES.values()]


def test_writes_outside_the_working_directory_leave_nothing(tmp_path, sandboxes):
    outside = tmp_path / "outside"
    outside.mkdir()
    results = run_programs(escape_attempts(outside), LIMITS, num_workers=2, tmp_root=sandboxes)
    check_nothing_escaped(outside, results)
    assert not any(result.passed for result in results)


@needs_landlock
def test_landlock_alone_stops_what_the_python_guard_cannot_see(tmp_path, sandboxes):
    """Without the Python guard, ctypes and subprocesses are available: the kernel still refuses the writes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    limits = dataclasses.replace(LIMITS, python_guard=False, landlock="require")
    results = run_programs(escape_attempts(outside), limits, num_workers=2, tmp_root=sandboxes)
    check_nothing_escaped(outside, results)
    raw = run_program(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.creat({str(outside / 'raw')!r}.encode(), 0o644) == -1\n"
        "assert ctypes.get_errno() == 13  # EACCES from Landlock",
        limits,
        tmp_root=sandboxes,
    )
    assert raw.passed, raw.stderr


def test_python_guard_alone_stops_the_ordinary_ways(tmp_path, sandboxes):
    outside = tmp_path / "outside"
    outside.mkdir()
    limits = dataclasses.replace(LIMITS, landlock="off")
    results = run_programs(escape_attempts(outside), limits, num_workers=2, tmp_root=sandboxes)
    check_nothing_escaped(outside, results)
    assert all(
        "PermissionError" in r.result or "ImportError" in r.result or "ModuleNotFound" in r.result for r in results
    ), [r.result for r in results]


def test_limits_are_checked():
    with pytest.raises(ValueError, match="landlock"):
        ExecutionLimits(landlock="sometimes")
    with pytest.raises(ValueError, match="positive"):
        ExecutionLimits(timeout_s=0)


def test_without_isolation_the_same_programs_do_escape(tmp_path, sandboxes):
    """The attempts above are real: with both layers off they write outside (into the test's own tmp_path)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    limits = dataclasses.replace(LIMITS, landlock="off", python_guard=False)
    programs = escape_attempts(outside)
    results = run_programs([programs[0], programs[1]], limits, num_workers=2, tmp_root=sandboxes)
    assert all(result.passed for result in results)
    assert (outside / "new").exists() and (outside / "existing.txt").read_text() == "keepx"


def test_a_broken_sandbox_raises_instead_of_failing_programs(sandboxes):
    """If the limits cannot be set, every program would "fail": that must stop the evaluation instead."""
    limits = dataclasses.replace(LIMITS, memory_bytes=1 << 70)  # beyond what setrlimit accepts
    with pytest.raises(RuntimeError, match="sandbox set-up failed"):
        run_program("print(1)", limits, tmp_root=sandboxes)


@needs_landlock
def test_tcp_connect_and_fork_are_refused(sandboxes):
    """Landlock ABI >= 4 refuses a TCP connect even to a listener on this machine; the guard refuses fork."""
    import socket

    if landlock_abi() < 4:
        pytest.skip("this kernel's Landlock predates TCP rules (ABI 4)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        kernel = dataclasses.replace(LIMITS, python_guard=False, landlock="require")
        result = run_program(connect, kernel, tmp_root=sandboxes)
        assert not result.passed and "PermissionError" in result.result, result
        open_door = run_program(connect, dataclasses.replace(LIMITS, landlock="off"), tmp_root=sandboxes)
        assert open_door.passed, open_door.stderr  # the listener is real: without Landlock the connect succeeds
    fork = run_program("import os\nos.fork()", LIMITS, tmp_root=sandboxes)
    assert not fork.passed and "os.fork is disabled" in fork.result

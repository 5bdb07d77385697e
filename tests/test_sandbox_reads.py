"""The sandbox confines reads: model-written programs read their working directory and the Python installation,
never the user's files (a Hub token in HOME, /etc/shadow, /root, another process's environment), while
ordinary HumanEval solutions that import the standard library still pass."""

import dataclasses
import logging
import os

import pytest

from starcoder2_train.evaluation import execution
from starcoder2_train.evaluation.execution import ExecutionLimits, run_program, run_programs
from starcoder2_train.evaluation.humaneval import harness_test_program, load_humaneval_problems
from starcoder2_train.evaluation.sandbox import landlock_abi, readable_paths

LIMITS = ExecutionLimits(timeout_s=5.0, memory_bytes=512 << 20)
SECRET = "hf_secretTOKEN0123456789"
needs_landlock = pytest.mark.skipif(landlock_abi() is None, reason="this kernel has no Landlock")
BOTH = LIMITS  # Landlock where the kernel has it, and the Python guard
KERNEL_ONLY = dataclasses.replace(LIMITS, python_guard=False, landlock="require")
GUARD_ONLY = dataclasses.replace(LIMITS, landlock="off")
NEITHER = dataclasses.replace(LIMITS, python_guard=False, landlock="off")

HOSTILE = {
    "token file": "print(open({token!r}).read())",
    "token via pathlib": "import pathlib\nprint(pathlib.Path({token!r}).read_text())",
    "token via os.open": "import os\nprint(os.read(os.open({token!r}, os.O_RDONLY), 100))",
    "token through a symlink made inside": "import os\nos.symlink({token!r}, 'link')\nprint(open('link').read())",
    "token by raw syscall": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "fd = libc.open({token!r}.encode(), 0)\nassert fd >= 0\nbuf = ctypes.create_string_buffer(100)\n"
    "libc.read(fd, buf, 100)\nprint(buf.value)",
    "/etc/shadow": "print(open('/etc/shadow').read(40))",
    "list /root": "import os\nprint(os.listdir('/root'))",
    "list HOME": "import os\nprint(os.listdir({home!r}))",
    "walk HOME": "import os\nprint(found := [f for _, _, files in os.walk({home!r}) for f in files])\nassert found",
    "parent's environment": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())",
}
ENVIRONMENT = """import os
print(dict(os.environ))
try:
    print(open('/proc/self/environ').read())
except PermissionError:
    pass
"""
# What a correct HumanEval answer may use: the standard library, its C extensions (zlib and hashlib open
# shared libraries), site-packages, a traceback-free run; and its working directory.
SOLUTION = """import bisect, collections, copy, dataclasses, datetime, decimal, fractions, functools, hashlib, heapq
import itertools, json, math, operator, random, re, statistics, string, struct, sys, textwrap, typing, zlib
from collections import Counter, defaultdict, deque
import numpy


def sort_words(text: str) -> list[str]:
    counts = Counter(re.findall(r"[a-z]+", text.lower()))
    return sorted(counts, key=lambda word: (-counts[word], word))


assert sort_words("b a b") == ["b", "a"]
assert math.gcd(12, 18) == 6 and math.isclose(statistics.mean([1, 2, 3]), 2.0)
assert list(itertools.accumulate([1, 2, 3])) == [1, 3, 6] and heapq.nsmallest(1, [3, 1]) == [1]
assert fractions.Fraction(1, 3) + fractions.Fraction(1, 6) == fractions.Fraction(1, 2)
assert decimal.Decimal("0.1") + decimal.Decimal("0.2") == decimal.Decimal("0.3")
assert hashlib.md5(b"x").hexdigest() and zlib.decompress(zlib.compress(b"abc")) == b"abc"
assert json.loads(json.dumps({"a": [1]})) == {"a": [1]} and random.Random(0).random() < 1
assert int(numpy.arange(4).sum()) == 6
open("scratch.txt", "w").write("kept")
assert open("scratch.txt").read() == "kept" and "scratch.txt" in __import__("os").listdir(".")
"""


@pytest.fixture(autouse=True)
def allowed(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


@pytest.fixture
def secrets(tmp_path, monkeypatch):
    """A fake Hub token in a temporary HOME, and HF_TOKEN in the evaluating process's environment."""
    home = tmp_path / "home"
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(SECRET)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return {"token": str(token), "home": str(home)}


def hostile(secrets, names=HOSTILE):
    return [HOSTILE[name].format(**secrets) for name in names]


def assert_nothing_read(results, names=HOSTILE):
    for name, result in zip(names, results):
        assert not result.passed, (name, result)
        assert SECRET not in result.stdout + result.stderr, name
        assert "root:" not in result.stdout and "hf_" not in result.stdout, (name, result.stdout)


def test_readable_paths_are_the_python_installation_and_system_libraries():
    import sys
    import sysconfig

    paths = readable_paths()
    assert os.path.realpath(sysconfig.get_paths()["stdlib"]) in paths or any(
        os.path.realpath(sysconfig.get_paths()["stdlib"]).startswith(path + os.sep) for path in paths
    )
    assert os.path.realpath(sys.prefix) in paths and "/usr/lib" in paths
    home = os.path.realpath(os.path.expanduser("~"))
    assert not any(home.startswith(path + os.sep) or path == home for path in paths if path != "/")
    assert not any(path in ("/", "/etc", "/proc", "/root", "/home", "/tmp") for path in paths)


@pytest.mark.parametrize("limits", [BOTH, GUARD_ONLY], ids=["landlock and guard", "guard alone"])
def test_hostile_reads_fail(secrets, limits, tmp_path):
    if limits.landlock != "off" and landlock_abi() is None:
        limits = GUARD_ONLY
    results = run_programs(hostile(secrets), limits, num_workers=2, tmp_root=str(tmp_path))
    assert_nothing_read(results)
    if limits.python_guard:
        refused = ("PermissionError", "ModuleNotFoundError", "AssertionError")  # os.walk skips what it may not list
        assert all(any(word in r.result for word in refused) for r in results), [r.result for r in results]


@needs_landlock
def test_landlock_alone_stops_reads_the_python_guard_cannot_see(secrets, tmp_path):
    """Without the Python guard ctypes is there: the kernel refuses the open (EACCES), even to root."""
    results = run_programs(hostile(secrets), KERNEL_ONLY, num_workers=2, tmp_root=str(tmp_path))
    assert_nothing_read(results)


def test_without_isolation_the_same_reads_succeed(secrets, tmp_path):
    """The attempts are real: with both layers off the token is read and HOME listed."""
    names = ["token file", "list HOME"]
    token, listing = run_programs(hostile(secrets, names), NEITHER, num_workers=2, tmp_root=str(tmp_path))
    assert token.passed and SECRET in token.stdout
    assert listing.passed and ".cache" in listing.stdout


def test_the_environment_holds_no_token(secrets, tmp_path):
    for limits in (BOTH, NEITHER):  # the environment is made anew in any case
        result = run_program(ENVIRONMENT, limits, tmp_root=str(tmp_path))
        assert result.passed and SECRET not in result.stdout and "HF_TOKEN" not in result.stdout, result


@pytest.mark.parametrize(
    "limits", [BOTH, GUARD_ONLY, KERNEL_ONLY], ids=["landlock and guard", "guard alone", "landlock alone"]
)
def test_a_correct_solution_still_passes(limits, tmp_path):
    if limits.landlock == "require" and landlock_abi() is None:
        pytest.skip("this kernel has no Landlock")
    result = run_program(SOLUTION, limits, tmp_root=str(tmp_path))
    assert result.passed, result.stderr
    failing = run_program("import math\n\n\ndef f():\n    return math.floor(1.5)\n\n\nassert f() == 2\n", limits)
    assert failing.result == "failed: AssertionError"
    assert "assert f() == 2" in failing.stderr  # the traceback quotes program.py: it can read its own source


def test_canonical_humaneval_solutions_pass(tmp_path):
    problems = load_humaneval_problems()[:12]
    programs = [harness_test_program(p, p["prompt"] + p["canonical_solution"]) for p in problems]
    results = run_programs(programs, BOTH, num_workers=2, tmp_root=str(tmp_path))
    assert all(r.passed for r in results), [
        (p["task_id"], r.result) for p, r in zip(problems, results) if not r.passed
    ]


def test_without_landlock_auto_warns_and_require_refuses(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(execution, "landlock_abi", lambda: None)
    monkeypatch.setattr(execution, "_warned_without_landlock", False)
    with caplog.at_level(logging.WARNING, logger=execution.__name__):
        assert run_program("print(1)", LIMITS, tmp_root=str(tmp_path)).passed
    assert "no Landlock: reads of your files" in caplog.text and "landlock='require'" in caplog.text
    with pytest.raises(RuntimeError, match="no Landlock"):
        run_program("print(1)", KERNEL_ONLY, tmp_root=str(tmp_path))

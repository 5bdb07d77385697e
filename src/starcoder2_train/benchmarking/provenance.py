"""Where a benchmark figure comes from, and the JSON file that keeps it.

`run_record(argv, script)` is what every benchmark JSON starts with: the commit of the code that ran (looked
up from the package's own directory, so it does not matter where the command was started; "unknown" outside
a git checkout or when git fails), whether tracked files differed from that commit, the date (UTC, ISO 8601),
the command, the machine and the versions of Python, torch and transformers. A figure is only as good as the
answer to "which code, on what, run how".
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess

import torch
import transformers

PACKAGE_DIRECTORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../src/starcoder2_train
PROJECT_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIRECTORY))  # the checkout, for an editable install
UNKNOWN = "unknown"


def git(directory: str, *words: str) -> str | None:
    """The output of `git -C directory WORDS`, or None where git is missing, fails or takes too long."""
    try:
        completed = subprocess.run(
            ["git", "-C", directory, *words], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def commit(directory: str = PACKAGE_DIRECTORY) -> str:
    """The commit checked out where `directory` lies (the package's source by default), or "unknown"."""
    return git(directory, "rev-parse", "HEAD") or UNKNOWN


def uncommitted_changes(directory: str = PACKAGE_DIRECTORY) -> bool | str:
    """Whether tracked files differ from the commit (then the figures are not that commit's), or "unknown"."""
    status = git(directory, "status", "--porcelain", "--untracked-files=no")
    return UNKNOWN if status is None else bool(status)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    processor = platform.processor() or platform.machine()
    return f"{processor}, {os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}"


def script_name(script: str) -> str:
    """The script as a path from the project's root (how the docs write commands), else as it is."""
    path = os.path.abspath(script)
    relative = os.path.relpath(path, PROJECT_ROOT)
    return path if relative.startswith(os.pardir) else relative


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(argv: list[str], script: str, directory: str = PACKAGE_DIRECTORY, packages=()) -> dict:
    """{"commit", "uncommitted_changes", "date", "command", "machine", "python", "torch", "transformers"},
    and the version of each of `packages` too (None where one is not installed)."""
    record = {
        "commit": commit(directory),
        "uncommitted_changes": uncommitted_changes(directory),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", script_name(script), *argv]),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    record.update({package: version(package) for package in packages})
    return record


def write_json(path: str, data) -> None:
    """Write `data` to `path` whole or not at all: a step killed at its time limit leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(partial, path)

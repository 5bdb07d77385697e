"""The inside of one sandboxed run: limits, Landlock, the Python guard, then the program as __main__.

`execution.run_program` starts `python -I -B sandbox.py CPU_S MEMORY FILE_SIZE NPROC LANDLOCK GUARD program.py`
in a fresh working directory. This file imports only what the child needs (os, sys, resource, ctypes):
each of the thousands of programs of a pass@k run pays for its imports again.
"""

import ctypes
import os
import resource
import sys

# --- Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture ---
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_FS_WRITE_FILE, _FS_REFER, _FS_TRUNCATE = 1 << 1, 1 << 13, 1 << 14
_FS_WRITE_TREE = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove_*, make_*
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int | None:
    """The kernel's Landlock ABI version, or None where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return version if version > 0 else None


def apply_landlock(workdir: str) -> None:
    """Restrict this process and its descendants: file writes only beneath `workdir` (and /dev/null);
    with ABI >= 4 no TCP bind or connect; with ABI >= 6 no signals to, or abstract sockets of, other processes."""
    libc, abi = ctypes.CDLL(None, use_errno=True), landlock_abi()
    if abi is None:
        raise OSError("Landlock is not available on this kernel")
    fs = _FS_WRITE_TREE | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(fs, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct grew with the ABI
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    file_rights = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    for path, rights in ((workdir, fs), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(rights, fd)
        status = libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
        if status < 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 or libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def install_python_guard(workdir: str) -> None:
    """Refuse, at the Python level, writes outside `workdir`, new processes, signals and ctypes.

    Not a security boundary (Python code can undo Python patches); it stops the ordinary ways with clear
    errors, and is the only barrier on a kernel without Landlock.
    """
    import builtins
    import io
    import shutil
    import subprocess

    root = os.path.realpath(workdir)
    real_open, real_os_open, realpath, readlink = builtins.open, os.open, os.path.realpath, os.readlink

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # a file descriptor: opened earlier, through this guard
            return True
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        resolved = realpath(path)
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(what, path):
        raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            refuse("writing", file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd):
            refuse("writing", path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open  # pathlib and tempfile go through these too
    os.open = guarded_os_open

    def guard_paths(name, count):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            for path in args[:count]:
                if not inside(path, dir_fd):
                    refuse(name, path)
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name in (
        "mkdir",
        "remove",
        "unlink",
        "rmdir",
        "truncate",
        "chmod",
        "chown",
        "lchown",
        "mkfifo",
        "mknod",
        "utime",
    ):
        if hasattr(os, name):
            guard_paths(name, 1)
    for name in ("rename", "replace", "link", "symlink"):
        guard_paths(name, 2)

    def disabled(name):
        def refuse_call(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled while running generated code")

        return refuse_call

    for name in (
        "system",
        "popen",
        "fork",
        "forkpty",
        "kill",
        "killpg",
        "setsid",
        "chroot",
        "putenv",
        "execv",
        "execve",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
        "spawnl",
        "spawnle",
        "posix_spawn",
        "posix_spawnp",
        "_exit",
    ):
        if hasattr(os, name):
            setattr(os, name, disabled(f"os.{name}"))
    subprocess.Popen = disabled("subprocess")
    shutil.rmtree, shutil.chown = disabled("shutil.rmtree"), disabled("shutil.chown")
    for module in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"):
        sys.modules[module] = None  # `import ctypes` now raises ImportError


SETUP_FAILED = "sandbox set-up failed"  # with exit status SETUP_FAILED_STATUS: the parent raises, not "fails"
SETUP_FAILED_STATUS = 125


def main(argv: list[str]) -> None:
    cpu_s, memory_bytes, file_size_bytes, max_processes, landlock, guard = (int(value) for value in argv[:6])
    program_path, workdir = argv[6], os.getcwd()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_bytes, file_size_bytes))
        if max_processes >= 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        if landlock:
            apply_landlock(workdir)
        if guard:
            install_python_guard(workdir)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except Exception as error:  # a broken sandbox must not pass for a failing program
        print(f"{SETUP_FAILED}: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(SETUP_FAILED_STATUS)
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    try:
        with open(program_path) as handle:
            exec(compile(handle.read(), program_path, "exec"), module.__dict__)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
        print("sandbox: the program called exit() before running to its end", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])

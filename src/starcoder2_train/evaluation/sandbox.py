"""The inside of one sandboxed run: limits, Landlock, the Python guard, then the program as __main__.

`execution.run_program` starts
`python -I -B sandbox.py CPU_S MEMORY FILE_SIZE NPROC LANDLOCK GUARD program.py READABLE...` in a fresh working
directory; READABLE are the paths of `readable_paths()`, found once by the parent. This file imports only what
the child needs (os, sys, resource, ctypes): each of the thousands of programs of a pass@k run pays for its
imports again.

What the program may read: its working directory, and beneath `readable_paths()`: the Python installation
(sys.prefix, sys.base_prefix and their exec_ twins, and sysconfig's stdlib, platstdlib, purelib and platlib:
the standard library, its extension modules and site-packages), the system library folders that the dynamic
loader opens when an extension module is imported (/lib, /lib64, /usr/lib, /usr/lib64 and sysconfig's LIBDIR;
`import zlib` opens libz.so there), /etc/ld.so.cache (the loader's index of them), /etc/localtime, /dev/urandom
and /dev/null. Nothing else: not HOME (a Hub token in ~/.cache/huggingface/token), not /etc/shadow, not /proc
(another process's environment). Landlock (ABI 1 on) does not restrict stat() or readlink(): a program can still
learn that a path exists and its size, not what it holds or what a folder lists.
"""

import ctypes
import os
import resource
import stat
import sys

# --- Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture ---
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_FS_READ = _FS_READ_FILE | _FS_READ_DIR
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE  # what a rule on a file may grant
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


# Read-only beyond the Python installation: the dynamic loader's folders and index, and two harmless files.
SYSTEM_READABLE = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache", "/etc/localtime")
SYSTEM_READABLE += ("/dev/null", "/dev/urandom")


def readable_paths() -> list[str]:
    """The paths, besides its working directory, beneath which a sandboxed program may read (module docstring):
    the existing ones, resolved (Landlock and the Python guard both judge the resolved path), without repeats."""
    import sysconfig

    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths += [sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths += [sysconfig.get_config_var("LIBDIR") or "", *SYSTEM_READABLE]
    resolved = (os.path.realpath(path) for path in paths if path and os.path.exists(path))
    return list(dict.fromkeys(resolved))


def apply_landlock(workdir: str, readable: list[str] = ()) -> None:
    """Restrict this process and its descendants: file writes only beneath `workdir` (and /dev/null); file reads
    and folder listings only beneath `workdir` and `readable`; no execve of any file; with ABI >= 4 no TCP bind
    or connect; with ABI >= 6 no signals to, or abstract sockets of, other processes.

    Execution is handled and granted nowhere: the interpreter is already running, and loading a shared library
    (dlopen, mmap) needs only the read right, so only new programs are refused.
    """
    libc, abi = ctypes.CDLL(None, use_errno=True), landlock_abi()
    if abi is None:
        raise OSError("Landlock is not available on this kernel")
    write = _FS_WRITE_TREE | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(write | _FS_READ | _FS_EXECUTE, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct grew with the ABI
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    null_rights = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    rules = [(workdir, write | _FS_READ), ("/dev/null", null_rights)] + [(path, _FS_READ) for path in readable]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if path in (workdir, "/dev/null"):
                raise
            continue  # a readable path gone since the parent listed it: nothing to allow
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FS_FILE_RIGHTS  # a rule on a file may not name folder rights (EINVAL)
        rule = _PathBeneathAttr(rights, fd)
        status = libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
        if status < 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 or libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def install_python_guard(workdir: str, readable: list[str] = ()) -> None:
    """Refuse, at the Python level, writes outside `workdir`, reads and listings outside `workdir` and
    `readable`, new processes, signals and ctypes.

    Not a security boundary (Python code can undo Python patches); it stops the ordinary ways with clear
    errors, and is the only barrier on a kernel without Landlock. Imports read through io.open_code and
    are not seen by it (Landlock, where present, confines them to `readable`).
    """
    import builtins
    import io
    import shutil
    import subprocess

    root = os.path.realpath(workdir)
    readable_roots = [root, *readable]
    real_open, real_os_open, realpath, readlink = builtins.open, os.open, os.path.realpath, os.readlink

    def resolve(path, dir_fd=None) -> str:
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def beneath(path, roots, dir_fd=None) -> bool:
        if isinstance(path, int):  # a file descriptor: opened earlier, through this guard
            return True
        resolved = resolve(path, dir_fd)
        return any(resolved == top or resolved.startswith(top.rstrip(os.sep) + os.sep) for top in roots)

    def inside(path, dir_fd=None) -> bool:
        return beneath(path, (root,), dir_fd)

    def refuse(what, path):
        raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")

    def check_read(path, dir_fd=None):
        if not beneath(path, readable_roots, dir_fd):
            raise PermissionError(
                f"sandbox: reading outside the working directory and the Python installation is not allowed: {path!r}"
            )

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            refuse("writing", file)
        check_read(file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd):
            refuse("writing", path)
        check_read(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open  # pathlib and tempfile go through these too
    os.open = guarded_os_open

    def guard_listing(name):  # os.walk, glob and pathlib's iterdir list through os.listdir and os.scandir
        real = getattr(os, name)

        def guarded_listing(path="."):
            check_read("." if path is None else path)
            return real(path)

        setattr(os, name, guarded_listing)

    guard_listing("listdir")
    guard_listing("scandir")

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
        "chroot",  # not putenv: without exec it changes only this process's environment, and numpy calls it
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
    program_path, readable, workdir = argv[6], argv[7:], os.getcwd()
    sys.path[0] = workdir  # as for `python program.py`: the program's folder, not this file's
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_bytes, file_size_bytes))
        if max_processes >= 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        if landlock:
            apply_landlock(workdir, readable)
        if guard:
            install_python_guard(workdir, readable)
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

"""A real one-node SLURM cluster on this machine, for the tests: Debian's `slurm-wlm` and `munge`, started as root.

`one_node_cluster(root)` writes a munge key and a slurm.conf under `root`, starts munged, slurmctld and slurmd
(each on ports of its own, so two test sessions never meet), waits until the node is idle, and yields the
environment the SLURM commands need (`SLURM_CONF`). On exit it stops the three daemons. The settings that work
in a container without cgroups or PMIx: `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`,
`MpiDefault=none`. The node is declared with this machine's CPUs and 1/2 of its memory; no GPUs (no GRES).

`skip_reason()` says why no cluster can be started here (not root; the binaries missing: `.ci/run` installs
them with apt), or None. Start-up takes about two seconds.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "squeue", "sinfo", "scancel", "srun")


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a SLURM cluster is started as root (slurmd runs jobs as their user); these tests run in CI as root"
    missing = [name for name in DAEMONS + COMMANDS if _sbin(name) is None]
    if missing:
        return f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _sbin(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ['PATH']}:/usr/sbin")


def _config(root: Path, host: str) -> str:
    controller_port, node_port = _free_ports(2)
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    return f"""ClusterName=tests
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={controller_port}
SlurmdPort={node_port}
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextlib.contextmanager
def one_node_cluster(root):
    """Start munged, slurmctld and slurmd under `root`; yield the environment for sbatch & co.; stop them."""
    root = Path(root)
    for folder in ("state", "spool"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(_config(root, host))
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
    munge = [_sbin("munged"), f"--key-file={key}", f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid"]
    munge += [f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed", "--force"]
    started = []
    try:
        for command in (munge, [_sbin("slurmctld"), "-i"], [_sbin("slurmd")]):
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
            started.append(command[0])
        wait_for(lambda: node_state(env) in ("idle", "mixed"), 60, f"the node to come up ({root}/slurmd.log)")
        yield env
    finally:
        _stop([root / f"{name}.pid" for name in ("slurmd", "slurmctld", "munged")])


def _stop(pid_files: list[Path], timeout: float = 15.0) -> None:
    """SIGTERM each daemon, wait for it to go (slurmctld saves its state first), SIGKILL what is left."""
    pids = []
    for pid_file in pid_files:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pid_file.read_text().strip()))
            os.kill(pids[-1], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(OSError):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def node_state(env: dict) -> str:
    """The node's state as sinfo prints it: idle, mixed, allocated, completing (a job's cleanup not done), ..."""
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return result.stdout.strip().rstrip("*")


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll `condition()` until it is truthy (returned) or `timeout` seconds pass (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def job_fields(env: dict, job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} once SLURM forgot the job."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)

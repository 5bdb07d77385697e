"""The upload to the Hub: what a user needs of a saved model, and, during training, what a resume needs.

`push_to_hub(output_dir, hub_model_id, ...)` uploads weights, config, tokenizer, card and results, and leaves
out optimizer states, pickles, logs and sub-checkpoints (UPLOAD_IGNORE_PATTERNS). With `dry_run_dir` it
writes exactly the folder it would upload, and uploads nothing.

During training, `BackgroundUploader` commits staged checkpoint folders from one background thread, one at a
time, with retries, never raising into training; the callback's
`DryRunRepository` stands in for the Hub offline.
"""

import fnmatch
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from huggingface_hub import HfApi

from starcoder2_train.configs import HUB_ID

# Never uploaded: training state (large, and pickles run code when loaded), logs, nested checkpoints.
UPLOAD_IGNORE_PATTERNS = (
    "checkpoint-*",
    "global_step*",
    "runs",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "zero_to_fp32.py",
    "latest",
    "checkpoint_complete.json",  # training/checkpoints.py's marker: about the checkpoint, not the model
    ".*",
    "*.lock",
)


# A checkpoint uploaded for resuming keeps everything the Trainer wrote (weights, optimizer.pt, scheduler.pt,
# scaler.pt, rng_state*.pth, trainer_state.json, training_args.bin; under DeepSpeed global_step*/, latest and
# zero_to_fp32.py) but hidden files and locks.
RESUME_IGNORE_PATTERNS = (".*", "*.lock")

logger = logging.getLogger(__name__)


def files_to_upload(output_dir: str, ignore_patterns: tuple[str, ...] = UPLOAD_IGNORE_PATTERNS) -> list[str]:
    """Paths (relative, sorted) that push_to_hub uploads from output_dir (a walk of the tree: cheap)."""
    selected = []
    for root, directories, files in os.walk(output_dir):
        directories[:] = [
            d for d in directories if not any(fnmatch.fnmatch(d, pattern) for pattern in ignore_patterns)
        ]
        for file in files:
            if not any(fnmatch.fnmatch(file, pattern) for pattern in ignore_patterns):
                selected.append(os.path.relpath(os.path.join(root, file), output_dir))
    return sorted(selected)


def resume_files(checkpoint: str) -> list[str]:
    """Paths (relative, sorted) of a checkpoint that a resume from it reads: all but hidden files and locks."""
    return files_to_upload(checkpoint, RESUME_IGNORE_PATTERNS)


def stage_files(output_dir: str, files: list[str], target: str, link: bool, copy: bool = True) -> list[str]:
    """Put `files` of output_dir into target: hard links where asked and possible, else copies; return the
    files neither linked nor (with copy=False) copied.

    A link costs a metadata write whatever the file's size, and keeps the data alive when the source is
    deleted (the Trainer's checkpoint rotation); a copy of a 3B checkpoint with optimizer states is ~36 GB.
    An existing destination is replaced, never written through (it may be a link to another checkpoint's file).
    """
    left = []
    for relative in files:
        source, destination = os.path.join(output_dir, relative), os.path.join(target, relative)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if os.path.lexists(destination):
            os.unlink(destination)
        if link:
            try:
                os.link(source, destination)  # no second copy of multi-GB weights
                continue
            except OSError:
                pass
        if copy:
            shutil.copy2(source, destination)
        else:
            left.append(relative)
    return left


def push_to_hub(
    output_dir: str,
    hub_model_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir: str | None = None,
    token: str | None = None,
) -> list[str]:
    """Upload output_dir (a checkpoint or the final model) to `hub_model_id`; return the uploaded paths.

    revision: a branch, made when missing (e.g. one per checkpoint). dry_run_dir: write the folder that would
    be uploaded there (it must be empty or absent) and upload nothing. Both paths stage the same file list.
    """
    if not os.path.isfile(os.path.join(output_dir, "config.json")):
        raise FileNotFoundError(f"{output_dir}: no config.json; push_to_hub takes a saved model or checkpoint.")
    if not os.path.isfile(os.path.join(output_dir, "README.md")):
        raise FileNotFoundError(
            f"{output_dir}: no README.md model card; write one first (starcoder2_train.model_card.write_model_card)."
        )
    if not HUB_ID.fullmatch(hub_model_id):
        raise ValueError(f"hub_model_id: {hub_model_id!r} is not of the form 'user-or-org/model-name'.")
    files = files_to_upload(output_dir)
    if dry_run_dir is not None:
        if os.path.isdir(dry_run_dir) and os.listdir(dry_run_dir):
            raise FileExistsError(f"dry_run_dir {dry_run_dir} is not empty; give an empty or new folder.")
        stage_files(output_dir, files, dry_run_dir, link=False)
        return files
    api = HfApi(token=token)
    api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(hub_model_id, branch=revision, exist_ok=True)
    # Staged next to output_dir, on the same file system, so that the weights are linked rather than copied.
    parent = os.path.dirname(os.path.abspath(output_dir))
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=parent) as staged:
        stage_files(output_dir, files, staged, link=True)
        api.upload_folder(
            repo_id=hub_model_id,
            folder_path=staged,
            revision=revision,
            commit_message=commit_message or f"Upload {os.path.basename(os.path.abspath(output_dir))}",
        )
    return files


@dataclass
class UploadJob:
    """One commit: `staged` (a folder laid out as the repository will hold it) uploaded to the repository root.

    refresh: (source, prefix in staged, selector): what appears in source after staging is linked in before
    the upload (other ranks' rng_state_{rank}.pth; copies where links failed). expected: staged paths waited
    for (bounded), else uploaded without; required: the same, else the job fails. supersedable: a newer job
    makes this one pointless (the same paths); its retries stop when one is waiting.
    """

    name: str
    staged: str
    commit_message: str
    delete_patterns: list[str] | None = None
    refresh: list[tuple[str, str, Callable[[str], list[str]]]] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    supersedable: bool = True
    status: str = "pending"  # pending, uploading, uploaded, failed, skipped, superseded, unfinished
    attempts: int = 0
    error: str | None = None
    future: Future = field(default_factory=Future)


class BackgroundUploader:
    """Commits UploadJobs to `repo_id` from one daemon thread: one upload in flight, `max_pending` waiting.

        uploader = BackgroundUploader("me/model", revision=None, upload_folder=HfApi().upload_folder)
        future = uploader.submit(job)       # returns at once; the future's result is the job's final status
        report = uploader.finish(timeout=600)

    Cost: `submit` only appends to a queue (microseconds), so no GPU waits for the Hub; a 3B checkpoint with
    optimizer states (~36 GB) takes minutes to upload. When saves come faster than uploads, the queue keeps
    the newest `max_pending` jobs: an older waiting job is dropped ("skipped", counted, logged), so the Hub
    always gets the newest checkpoint next. Each job's staged folder holds its disk blocks (hard links) until
    the job ends, so the extra disk is at most (1 + max_pending) checkpoints that rotation has deleted.

    A failed upload (any exception of upload_folder) is retried `retries` times after backoff_s, 2*backoff_s,
    ... (at most max_backoff_s); a job still failing is logged with its name and error, counted, and the run
    goes on: nothing is ever raised into training. upload_folder: HfApi.upload_folder's keyword signature
    (a fake in tests, DryRunRepository offline); default: HfApi(token).upload_folder, after create_repo (and
    create_branch for a revision) once. HfApi.run_as_future is not used: its worker thread is not a daemon
    and its queue is unbounded, so an upload still running at exit would hold the process past `finish`.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool = False,
        token: str | None = None,
        upload_folder: Callable | None = None,
        retries: int = 3,
        backoff_s: float = 30.0,
        max_backoff_s: float = 600.0,
        max_pending: int = 1,
        expected_wait_s: float = 60.0,
    ):
        if max_pending < 1:
            raise ValueError("BackgroundUploader: max_pending must be at least 1.")
        self.repo_id, self.revision, self.private, self.token = repo_id, revision, private, token
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.max_pending, self.expected_wait_s = max_pending, expected_wait_s
        self._upload_folder, self._repo_ready = upload_folder, upload_folder is not None
        self._pending: deque[UploadJob] = deque()
        self._trash: list[str] = []
        self._current: UploadJob | None = None
        self.jobs: list[UploadJob] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: UploadJob) -> Future:
        """Queue job (dropping the oldest waiting one when the queue is full); never blocks, never raises."""
        with self._lock:
            self.jobs.append(job)
            if self._stop.is_set():
                self._end(job, "skipped", "submitted after finish()")
                return job.future
            while len(self._pending) >= self.max_pending:
                old = self._pending.popleft()
                logger.warning("hub upload of %s skipped: %s is newer and uploads instead", old.name, job.name)
                self._end(old, "skipped", f"replaced in the queue by {job.name}", cleanup=False)
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="hub-upload", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return job.future

    def finish(self, timeout: float | None = 600.0) -> dict:
        """Wait up to timeout seconds for the jobs in flight and waiting, then stop; return the report.

        Jobs not done by then are "unfinished": one being uploaded goes on in its daemon thread until the
        process exits (a Hub commit is atomic per batch: an interrupted one leaves no partial commit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending or self._current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
            self._stop.set()
            for job in [*self._pending, *([self._current] if self._current else [])]:
                logger.warning("hub upload of %s unfinished at the end of training", job.name)
                if job is self._current:  # the worker records how it ends, if it ends before the process
                    job.status, job.error = "unfinished", f"not done after the final wait of {timeout} s"
                else:
                    self._end(job, "unfinished", f"still waiting after the final wait of {timeout} s")
            self._pending.clear()
            self._lock.notify_all()
        while self._trash:
            shutil.rmtree(self._trash.pop(), ignore_errors=True)
        return self.report()

    def report(self) -> dict:
        """{"uploaded": [names], "failed": {name: error}, "skipped": [...], ..., "counts": {status: n}}."""
        report = {"uploaded": [], "failed": {}, "skipped": [], "superseded": [], "unfinished": [], "pending": []}
        for job in self.jobs:
            if job.status == "failed":
                report["failed"][job.name] = job.error
            else:  # "uploading" counts as pending
                report.get(job.status, report["pending"]).append(job.name)
        report["counts"] = {key: len(value) for key, value in report.items()}
        return report

    def record_failure(self, name: str, error: str) -> None:
        """Count a job that failed before it could be queued (e.g. while staging)."""
        with self._lock:
            self.jobs.append(job := UploadJob(name=name, staged="", commit_message=""))
            self._end(job, "failed", error)

    def _end(self, job: UploadJob, status: str, error: str | None = None, cleanup: bool = True) -> None:
        """Settle job; its staged links are removed here, or (cleanup=False: on the training thread, where
        unlinking the last link of a rotated 36 GB checkpoint may take a while) by the upload thread."""
        job.status, job.error = status, error
        if job.staged:
            shutil.rmtree(job.staged, ignore_errors=True) if cleanup else self._trash.append(job.staged)
        if not job.future.done():
            job.future.set_result(status)

    def _work(self) -> None:
        while True:
            while self._trash:
                shutil.rmtree(self._trash.pop(), ignore_errors=True)
            with self._lock:
                while not self._pending and not self._stop.is_set():
                    self._lock.wait()
                if self._stop.is_set():
                    return
                job = self._current = self._pending.popleft()
                job.status = "uploading"
            try:
                status, error = self._run(job)
            except BaseException as exception:  # noqa: BLE001 - nothing may escape into training
                status, error = "failed", f"{type(exception).__name__}: {exception}"
            with self._lock:
                if job.status == "uploading":
                    self._end(job, status, error)
                else:  # finish() gave up on it meanwhile; keep "unfinished" but record the outcome
                    self._end(job, job.status, f"{job.error}; then {status}" + (f": {error}" if error else ""))
                self._current = None
                self._lock.notify_all()

    def _run(self, job: UploadJob) -> tuple[str, str | None]:
        started = time.monotonic()
        lost = self._complete(job)
        if lost:
            return "failed", f"the checkpoint was deleted before {lost} could be copied (no hard links here)"
        error = None
        for attempt in range(self.retries + 1):
            if self._stop.is_set():  # finish() gave up: no new attempt (it could land after the final push)
                return "unfinished", error
            job.attempts = attempt + 1
            try:
                self._prepare_repo()
                self._upload_folder(
                    repo_id=self.repo_id,
                    folder_path=job.staged,
                    commit_message=job.commit_message,
                    revision=self.revision,
                    delete_patterns=job.delete_patterns,
                )
                seconds = time.monotonic() - started
                logger.info("hub upload of %s done in %.0f s (%d attempts)", job.name, seconds, job.attempts)
                return "uploaded", None
            except Exception as exception:  # noqa: BLE001 - the Hub's, the network's or the disk's: all retried
                error = f"{type(exception).__name__}: {exception}"
            if attempt == self.retries:
                break
            if job.supersedable and self._pending:
                logger.warning("hub upload of %s failed (%s); a newer checkpoint is waiting: dropped", job.name, error)
                return "superseded", error
            delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            logger.warning("hub upload of %s failed (%s); retry %d in %.0f s", job.name, error, attempt + 1, delay)
            if self._stop.wait(delay):
                break
        logger.error("hub upload of %s failed after %d attempts: %s; training goes on", job.name, job.attempts, error)
        return "failed", error

    def _complete(self, job: UploadJob) -> list[str]:
        """Link (or copy) in what appeared in the sources after staging, waiting (bounded) for the expected
        and required files; return the required ones still missing."""
        deadline = time.monotonic() + self.expected_wait_s
        while True:
            self._refresh(job)
            missing = [p for p in job.expected + job.required if not os.path.lexists(os.path.join(job.staged, p))]
            gone = not any(os.path.isdir(source) for source, _, _ in job.refresh)  # nothing more can appear
            if not missing or gone or self._stop.is_set() or time.monotonic() > deadline:
                break
            self._stop.wait(0.5)
        if set(missing) - set(job.required):
            logger.warning(
                "hub upload of %s goes without %s (not written, or on another node's disk)", job.name, missing
            )
        return [path for path in missing if path in job.required]

    def _refresh(self, job: UploadJob) -> None:
        for source, prefix, select in job.refresh:
            if not os.path.isdir(source):
                continue
            target = os.path.join(job.staged, prefix)
            try:
                new = [path for path in select(source) if not os.path.lexists(os.path.join(target, path))]
                stage_files(source, new, target, link=True)
            except OSError:  # rotation deleted the source meanwhile: keep what was staged
                pass

    def _prepare_repo(self) -> None:
        if self._repo_ready:
            return
        api = HfApi(token=self.token)
        api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        if self.revision and self.revision != "main":
            api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._upload_folder, self._repo_ready = api.upload_folder, True

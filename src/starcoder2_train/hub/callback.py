"""`ModelCardCallback`: a model card in every checkpoint the Trainer saves, and its upload in the background.

`hub_strategy` means what transformers' TrainingArguments documents (the project turns the Trainer's own
push off and does it here, with its model card and dry run):

- `end`: nothing during training (scripts/run_pretrain.py pushes the final model);
- `every_save`: at each save, the model (weights, config, generation config), the tokenizer and the model
  card, to the root of the repository;
- `checkpoint`: every_save, plus the whole checkpoint (what a resume reads: optimizer.pt, scheduler.pt,
  scaler.pt, rng_state*.pth, trainer_state.json, training_args.bin, DeepSpeed's global_step*/ and latest)
  in `last-checkpoint/`, replacing the previous one in the same commit;
- `all_checkpoints`: every_save, plus each checkpoint in its own `checkpoint-N/` folder.
"""

import fnmatch
import json
import logging
import os
import shutil

from transformers import TrainerCallback

from starcoder2_train.configs import RecipeError
from starcoder2_train.hub.model_card import write_model_card
from starcoder2_train.hub.upload import (
    BackgroundUploader,
    UploadJob,
    files_to_upload,
    resume_files,
    stage_files,
)

logger = logging.getLogger(__name__)

HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STAGING_DIR = ".hub-uploads"  # in output_dir: same file system as the checkpoints, so staging is hard links


def missing_resume_files(files: list[str], world_size: int = 1) -> list[str]:
    """What a resume needs that `files` (of a checkpoint) lacks: trainer state, optimizer, scheduler, RNG states.

    The optimizer is optimizer.pt (optimizer.bin, FSDP's per-rank files), or DeepSpeed's global_step*/ folder;
    the RNG state is rng_state.pth on one process, rng_state_{rank}.pth for each of world_size ranks.
    """
    names = set(files)
    missing = [name for name in ("trainer_state.json", "scheduler.pt") if name not in names]
    if not any(n.startswith(("optimizer.", "optimizer_", "global_step")) or "-optimizer." in n for n in names):
        missing.append("optimizer.pt (or DeepSpeed's global_step*/)")
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return missing + [name for name in rng if name not in names]


def hub_strategy_name(hub_strategy) -> str:
    """'checkpoint' from "checkpoint" or HubStrategy.CHECKPOINT; RecipeError for a strategy not implemented."""
    name = getattr(hub_strategy, "value", hub_strategy)
    if name not in HUB_STRATEGIES:
        raise RecipeError(f"hub_strategy: {hub_strategy!r} is not one of {', '.join(HUB_STRATEGIES)}.")
    return name


def stage_checkpoint(checkpoint: str, staged: str, strategy: str, step: int, world_size: int = 1) -> UploadJob | None:
    """Hard-link what `strategy` uploads of checkpoint into staged, laid out as the repository; the job
    (None when there is nothing to upload: every_save of a checkpoint without model weights).

    Cost: one link per file (a few hundred under DeepSpeed with many ranks: milliseconds), no data copied;
    the links keep the files when save_total_limit rotation deletes the checkpoint during the upload. Where
    the file system refuses links, the files are copied later by the upload thread (a 3B checkpoint with
    optimizer states: ~36 GB, minutes), never here; if rotation deletes the checkpoint first, that upload
    fails (reported): keep save_total_limit at 2 or more there, so a checkpoint outlives the next save.
    """
    model_files = files_to_upload(checkpoint)
    has_weights = any(os.path.basename(path) in WEIGHT_FILES for path in model_files)
    job = UploadJob(
        name=os.path.basename(checkpoint),
        staged=staged,
        commit_message=f"Training in progress, step {step}",
        supersedable=strategy != "all_checkpoints",
    )
    if has_weights:
        job.required += stage_files(checkpoint, model_files, staged, link=True, copy=False)
        job.refresh.append((checkpoint, "", files_to_upload))
    else:  # e.g. FSDP's sharded state: no plain model in the checkpoint
        logger.warning("%s has no model weights file: its model is not pushed (the checkpoint still is)", checkpoint)
    if strategy in ("checkpoint", "all_checkpoints"):
        prefix = "last-checkpoint" if strategy == "checkpoint" else job.name
        files = resume_files(checkpoint)
        left = stage_files(checkpoint, files, os.path.join(staged, prefix), link=True, copy=False)
        job.required += [f"{prefix}/{path}" for path in left]
        job.commit_message += ", checkpoint"
        job.refresh.append((checkpoint, prefix, resume_files))  # other ranks' rng_state_{rank}.pth may be late
        if strategy == "checkpoint":
            job.delete_patterns = [f"{prefix}/*"]  # the previous checkpoint's files (added paths are kept)
        if any(path.startswith("rng_state") for path in files) and world_size > 1:
            job.expected = [f"{prefix}/rng_state_{rank}.pth" for rank in range(world_size)]
        missing = [
            name
            for name in missing_resume_files(files, world_size)
            if not (name.startswith("rng_state_") and name != "rng_state_0.pth")  # other ranks': waited for
        ]
        if missing:
            logger.warning("%s lacks %s: a resume from the uploaded copy will not restore them", checkpoint, missing)
    elif not has_weights:
        return None
    return job


class ModelCardCallback(TrainerCallback):
    """Write the model card into each checkpoint the Trainer saves; with a hub_strategy, upload it too.

        ModelCardCallback(recipe, tokens_per_step=..., evaluation=evaluation_callback, hub_model_id="me/model",
                          hub_strategy="checkpoint")

    Use it instead of TrainingArguments.push_to_hub, whose upload writes the Trainer's own README.
    tokens seen: the Trainer's count when it keeps one (include_num_input_tokens_seen), else
    global_step * tokens_per_step. evaluation: an EvaluationCallback, whose latest results go into the card.
    hub_strategy: see the module docstring; push_checkpoints=True is the older spelling of "checkpoint".

    Uploads run on the main process only, in a BackgroundUploader (one in flight, the newest waiting, retries,
    failures logged and counted, never raised): on_save costs the card and the hard links (milliseconds), not
    the upload (minutes for a 3B checkpoint with optimizer states, ~36 GB), so no GPU waits for the Hub. At
    the end of training, on_train_end waits at most final_wait_s for the upload in flight and the newest
    waiting one, then logs and keeps in `upload_report` what was uploaded, failed, skipped or left unfinished.
    The other ranks wait meanwhile in the final save's collectives: keep final_wait_s under the process
    group's timeout (NCCL's default: 10 minutes). When training stopped before max_steps (a preemption, whose
    grace period is ~120 s), the wait is stop_wait_s: the checkpoint is on disk and the next run uploads again.
    dry_run_dir: upload nothing; apply the commits to DryRunRepository(dry_run_dir) instead (it must not be
    the final push_to_hub's dry_run_dir, which must stay empty). uploader: a BackgroundUploader to use instead.
    """

    def __init__(
        self,
        recipe: dict,
        *,
        tokens_per_step: int | None = None,
        evaluation=None,
        hub_model_id: str | None = None,
        private: bool = False,
        push_checkpoints: bool = False,
        hub_strategy=None,
        hub_revision: str | None = None,
        hub_token: str | None = None,
        dry_run_dir: str | None = None,
        uploader: BackgroundUploader | None = None,
        final_wait_s: float = 300.0,
        stop_wait_s: float = 10.0,
    ):
        strategy = hub_strategy_name(hub_strategy or ("checkpoint" if push_checkpoints else "end"))
        if strategy != "end" and not hub_model_id:
            raise RecipeError(f"hub_model_id: hub_strategy {strategy} needs the repository to push to.")
        self.recipe, self.tokens_per_step, self.evaluation = recipe, tokens_per_step, evaluation
        self.hub_model_id, self.private, self.hub_strategy = hub_model_id, private, strategy
        self.hub_revision, self.hub_token, self.dry_run_dir = hub_revision, hub_token, dry_run_dir
        self.uploader, self.final_wait_s, self.stop_wait_s = uploader, final_wait_s, stop_wait_s
        self.upload_report: dict | None = None

    def _uploader(self) -> BackgroundUploader:
        if self.uploader is None:  # made on the main process only, at its first save
            upload_folder = DryRunRepository(self.dry_run_dir).upload_folder if self.dry_run_dir else None
            self.uploader = BackgroundUploader(
                self.hub_model_id,
                revision=self.hub_revision,
                private=self.private,
                token=self.hub_token,
                upload_folder=upload_folder,
            )
        return self.uploader

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.hub_strategy != "end":  # links left by a run that was killed
            shutil.rmtree(os.path.join(args.output_dir, STAGING_DIR), ignore_errors=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        tokens = state.num_input_tokens_seen or (
            state.global_step * self.tokens_per_step if self.tokens_per_step else None
        )
        results = self.evaluation.latest_results if self.evaluation is not None else None
        write_model_card(
            checkpoint, self.recipe, tokens_seen=tokens, eval_results=results, hub_model_id=self.hub_model_id
        )
        if self.hub_strategy == "end":
            return
        staged = os.path.join(args.output_dir, STAGING_DIR, os.path.basename(checkpoint))
        try:
            shutil.rmtree(staged, ignore_errors=True)
            job = stage_checkpoint(checkpoint, staged, self.hub_strategy, state.global_step, args.world_size)
        except OSError as error:  # a full disk, a vanished file: the run goes on, the upload is reported failed
            logger.error("hub upload of %s failed while staging: %s; training goes on", checkpoint, error)
            shutil.rmtree(staged, ignore_errors=True)
            self._uploader().record_failure(os.path.basename(checkpoint), f"staging: {error}")
            return
        if job is not None:
            self._uploader().submit(job)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.uploader is None:
            return
        stopped = bool(state.max_steps) and state.global_step < state.max_steps
        report = self.upload_report = self.uploader.finish(self.stop_wait_s if stopped else self.final_wait_s)
        logger.info("hub uploads during training: %s", report["counts"])
        for name, error in report["failed"].items():
            logger.error("hub upload of %s failed: %s", name, error)
        for status in ("skipped", "superseded", "unfinished"):
            if report[status]:
                logger.warning("hub uploads %s: %s", status, ", ".join(report[status]))


class DryRunRepository:
    """HfApi.upload_folder offline: each commit is applied to root/<revision>/, a mirror of the repository.

    root/commits.jsonl lists the commits (message, revision, files). Files are hard-linked where possible, so a
    mirror of multi-GB checkpoints costs no disk until the run deletes them.
    """

    def __init__(self, root: str):
        self.root = root

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, revision=None, **options):
        delete_patterns = options.get("delete_patterns")
        target = os.path.join(self.root, revision or "main", path_in_repo or "")
        files = files_to_upload(str(folder_path), (".git",))
        if delete_patterns and os.path.isdir(target):
            patterns = [delete_patterns] if isinstance(delete_patterns, str) else delete_patterns
            for stale in set(files_to_upload(target, ())) - set(files):
                if any(fnmatch.fnmatch(stale, pattern) for pattern in patterns):
                    os.unlink(os.path.join(target, stale))
        stage_files(str(folder_path), files, target, link=True)
        with open(os.path.join(self.root, "commits.jsonl"), "a", encoding="utf-8") as log:
            entry = {"repo_id": repo_id, "revision": revision, "message": commit_message, "files": files}
            log.write(json.dumps(entry) + "\n")
        return entry

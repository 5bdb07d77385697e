"""The upload to the Hub: what a user needs of a saved model, and nothing else.

`push_to_hub(output_dir, hub_model_id, ...)` uploads weights, config, tokenizer, card and results, and leaves
out optimizer states, pickles, logs and sub-checkpoints (UPLOAD_IGNORE_PATTERNS). With `dry_run_dir` it
writes exactly the folder it would upload, and uploads nothing.
"""

import fnmatch
import os
import shutil
import tempfile

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
    ".*",
    "*.lock",
)


def files_to_upload(output_dir: str) -> list[str]:
    """Paths (relative, sorted) that push_to_hub uploads from output_dir."""
    selected = []
    for root, directories, files in os.walk(output_dir):
        directories[:] = [
            d for d in directories if not any(fnmatch.fnmatch(d, pattern) for pattern in UPLOAD_IGNORE_PATTERNS)
        ]
        for file in files:
            if not any(fnmatch.fnmatch(file, pattern) for pattern in UPLOAD_IGNORE_PATTERNS):
                selected.append(os.path.relpath(os.path.join(root, file), output_dir))
    return sorted(selected)


def _stage(output_dir: str, files: list[str], target: str, link: bool) -> None:
    """Put `files` of output_dir into target: hard links where asked and possible, else copies."""
    for relative in files:
        source, destination = os.path.join(output_dir, relative), os.path.join(target, relative)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if link:
            try:
                os.link(source, destination)  # no second copy of multi-GB weights
                continue
            except OSError:
                pass
        shutil.copy2(source, destination)


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
        _stage(output_dir, files, dry_run_dir, link=False)
        return files
    api = HfApi(token=token)
    api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(hub_model_id, branch=revision, exist_ok=True)
    # Staged next to output_dir, on the same file system, so that the weights are linked rather than copied.
    parent = os.path.dirname(os.path.abspath(output_dir))
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=parent) as staged:
        _stage(output_dir, files, staged, link=True)
        api.upload_folder(
            repo_id=hub_model_id,
            folder_path=staged,
            revision=revision,
            commit_message=commit_message or f"Upload {os.path.basename(os.path.abspath(output_dir))}",
        )
    return files

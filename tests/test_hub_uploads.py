"""Checkpoint uploads in the background, as hub_strategy says: all offline, against a fake Hub or a dry run."""

import hashlib
import inspect
import json
import logging
import os
import shutil
import threading
import time

import pytest
import torch
from huggingface_hub import HfApi
from test_callbacks import Windows, tiny_model
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

from starcoder2_train.configs import RecipeError
from starcoder2_train.hub.callback import ModelCardCallback, missing_resume_files, stage_checkpoint
from starcoder2_train.hub.upload import BackgroundUploader, resume_files

RECIPE = {"model_config": "test", "seq_length": 48}
MODEL = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}
RESUME = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


class FakeHub:
    """HfApi.upload_folder's signature; records what the folder holds when it is read (after `delay` s),
    fails the first `failures` calls (or all of them), and keeps the repository's files as a dict."""

    def __init__(self, failures: int | float = 0, delay: float = 0.0, wait_for=None):
        self.failures, self.delay, self.wait_for, self.calls, self.repo = failures, delay, wait_for, [], {}
        self.started = threading.Event()

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        commit_description=None,
        token=None,
        repo_type=None,
        revision=None,
        create_pr=None,
        parent_commit=None,
        allow_patterns=None,
        ignore_patterns=None,
        delete_patterns=None,
        run_as_future=False,
    ):
        self.started.set()
        time.sleep(self.delay)
        deadline = time.monotonic() + 30
        while self.wait_for is not None and not self.wait_for() and time.monotonic() < deadline:
            time.sleep(0.05)
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                with open(os.path.join(root, name), "rb") as file:
                    files[os.path.relpath(os.path.join(root, name), folder_path)] = hashlib.sha256(
                        file.read()
                    ).digest()
        self.calls.append(dict(repo_id=repo_id, revision=revision, message=commit_message, files=files))
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("503 Service Unavailable")
        for pattern in delete_patterns or []:
            prefix = pattern.rstrip("*")
            self.repo = {path: digest for path, digest in self.repo.items() if not path.startswith(prefix)}
        self.repo.update(files)
        return "commit"


def test_the_fake_has_the_signature_of_upload_folder():
    assert inspect.signature(FakeHub.upload_folder).parameters.keys() == (
        inspect.signature(HfApi.upload_folder).parameters.keys()
    )


def make_checkpoint(output_dir, step: int, size: int = 1 << 20):
    """A checkpoint folder as the Trainer writes one (dummy contents)."""
    checkpoint = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(checkpoint)
    for name in MODEL - {"README.md"} | TOKENIZER | RESUME:
        with open(os.path.join(checkpoint, name), "wb") as file:
            file.write(os.urandom(size if name.endswith((".safetensors", ".pt")) else 64))
    return checkpoint


def save(callback, output_dir, step: int, world_zero: bool = True):
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True)
    state = TrainerState(global_step=step, is_world_process_zero=world_zero)
    started = time.perf_counter()
    callback.on_save(args, state, TrainerControl())
    return time.perf_counter() - started, args, state


def uploader(hub: FakeHub, **options) -> BackgroundUploader:
    return BackgroundUploader("me/sc2-test", upload_folder=hub.upload_folder, **{"backoff_s": 0.01, **options})


def test_upload_runs_in_the_background(tmp_path):
    hub = FakeHub(delay=2.0)
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", uploader=uploader(hub))
    make_checkpoint(tmp_path, 10)
    seconds, args, state = save(callback, tmp_path, 10)
    assert seconds < 0.1 and not hub.calls  # the card and the hard links only; the upload takes 2 s
    assert hub.started.wait(1.0)
    callback.on_train_end(args, state, TrainerControl())
    assert callback.upload_report["uploaded"] == ["checkpoint-10"] and len(hub.calls) == 1
    files = hub.calls[0]["files"]
    assert MODEL | TOKENIZER <= set(files) and {f"last-checkpoint/{name}" for name in RESUME | MODEL} <= set(files)
    assert not (RESUME - {"trainer_state.json"}) & set(files)  # pickled training state only in last-checkpoint/
    assert hub.calls[0]["message"] == "Training in progress, step 10, checkpoint"
    assert not os.path.exists(tmp_path / ".hub-uploads" / "checkpoint-10")  # staging removed after the upload


def test_main_process_only(tmp_path):
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="every_save")
    make_checkpoint(tmp_path, 3)
    save(callback, tmp_path, 3, world_zero=False)
    assert callback.uploader is None and not os.path.exists(tmp_path / "checkpoint-3" / "README.md")


def test_failures_are_retried_with_backoff(tmp_path, caplog):
    hub = FakeHub(failures=2)
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="every_save", uploader=uploader(hub))
    make_checkpoint(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="starcoder2_train.hub.upload"):
        _, args, state = save(callback, tmp_path, 4)
        assert callback.uploader.jobs[0].future.result(timeout=10) == "uploaded"
    assert len(hub.calls) == 3 and callback.uploader.jobs[0].attempts == 3
    # every_save: what the final push_to_hub uploads of a folder (the model, tokenizer, card, trainer_state.json)
    assert set(hub.repo) == MODEL | TOKENIZER | {"trainer_state.json"}
    assert "retry 2 in 0 s" in caplog.text and "503 Service Unavailable" in caplog.text


def test_uploads_slower_than_saves_skip_to_the_newest(tmp_path):
    hub = FakeHub(delay=0.5)
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", uploader=uploader(hub))
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
        _, args, state = save(callback, tmp_path, step)
        if step == 1:
            assert hub.started.wait(1.0)  # checkpoint-1 in flight; 2 and 3 wait in turn and are replaced
    callback.on_train_end(args, state, TrainerControl())
    report = callback.upload_report
    assert report["uploaded"] == ["checkpoint-1", "checkpoint-4"] and report["skipped"] == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert report["counts"]["skipped"] == 2 and report["counts"]["failed"] == 0
    assert not os.listdir(tmp_path / ".hub-uploads")


def test_final_wait_is_bounded(tmp_path):
    hub = FakeHub(delay=3.0)
    callback = ModelCardCallback(
        RECIPE, hub_model_id="me/sc2-test", hub_strategy="every_save", uploader=uploader(hub), final_wait_s=0.2
    )
    make_checkpoint(tmp_path, 1)
    _, args, state = save(callback, tmp_path, 1)
    started = time.perf_counter()
    callback.on_train_end(args, state, TrainerControl())
    assert time.perf_counter() - started < 1.0 and callback.upload_report["unfinished"] == ["checkpoint-1"]


def test_a_stopped_run_waits_briefly(tmp_path):
    """Preempted (stopped before max_steps): the wait is stop_wait_s, not final_wait_s."""
    hub = FakeHub(delay=3.0)
    callback = ModelCardCallback(
        RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", uploader=uploader(hub), stop_wait_s=0.1
    )
    make_checkpoint(tmp_path, 5)
    _, args, state = save(callback, tmp_path, 5)
    state.max_steps = 100
    started = time.perf_counter()
    callback.on_train_end(args, state, TrainerControl())
    assert time.perf_counter() - started < 1.0 and callback.upload_report["unfinished"] == ["checkpoint-5"]


def test_unknown_strategy_is_refused():
    with pytest.raises(RecipeError, match="hub_strategy"):
        ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="every_step")
    with pytest.raises(RecipeError, match="hub_model_id"):
        ModelCardCallback(RECIPE, hub_strategy="checkpoint")
    assert ModelCardCallback(RECIPE, hub_model_id="me/x", push_checkpoints=True).hub_strategy == "checkpoint"
    assert ModelCardCallback(RECIPE).hub_strategy == "end"


def test_deepspeed_checkpoint_is_resumable(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 5)
    os.remove(os.path.join(checkpoint, "optimizer.pt"))
    for name in ("global_step5/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest", "zero_to_fp32.py"):
        os.makedirs(os.path.dirname(os.path.join(checkpoint, name)), exist_ok=True)
        open(os.path.join(checkpoint, name), "w").close()
    files = resume_files(checkpoint)
    assert "global_step5/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "latest" in files
    assert missing_resume_files(files) == [] and missing_resume_files(files, world_size=2) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    job = stage_checkpoint(checkpoint, str(tmp_path / "staged"), "all_checkpoints", 5)
    assert os.path.isfile(
        tmp_path / "staged" / "checkpoint-5" / "global_step5" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    assert job.delete_patterns is None and not job.supersedable


def test_late_rank_files_are_waited_for(tmp_path):
    """Other ranks write rng_state_{rank}.pth without a barrier: the upload waits (bounded) and links them."""
    checkpoint = make_checkpoint(tmp_path, 2)
    os.rename(os.path.join(checkpoint, "rng_state.pth"), os.path.join(checkpoint, "rng_state_0.pth"))
    job = stage_checkpoint(checkpoint, str(tmp_path / "staged"), "checkpoint", 2, world_size=2)
    hub = FakeHub()
    future = uploader(hub).submit(job)
    time.sleep(0.2)
    open(os.path.join(checkpoint, "rng_state_1.pth"), "wb").close()
    assert future.result(timeout=10) == "uploaded"
    assert {"last-checkpoint/rng_state_0.pth", "last-checkpoint/rng_state_1.pth"} <= set(hub.calls[0]["files"])


def test_without_hard_links_the_upload_thread_copies(tmp_path, monkeypatch):
    def refuse(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    hub = FakeHub(delay=0.5)
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", uploader=uploader(hub))
    make_checkpoint(tmp_path, 1, size=8 << 20)
    seconds, *_ = save(callback, tmp_path, 1)
    assert seconds < 0.1  # nothing copied on the training thread
    assert hub.started.wait(2.0)
    make_checkpoint(tmp_path, 2)
    _, args, state = save(callback, tmp_path, 2)
    shutil.rmtree(tmp_path / "checkpoint-2")  # rotated away before the upload thread could copy it
    callback.on_train_end(args, state, TrainerControl())
    report = callback.upload_report
    assert report["uploaded"] == ["checkpoint-1"] and "could be copied" in report["failed"]["checkpoint-2"]
    assert {f"last-checkpoint/{name}" for name in RESUME | MODEL} | MODEL <= set(hub.calls[0]["files"])


def train(output_dir, callback, tokenizer=None, **extra):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )
    trainer = Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=Windows(8),
        processing_class=tokenizer,
        callbacks=[callback],
        data_collator=default_data_collator,
    )
    trainer.train()
    return trainer


def test_rotation_during_an_upload_still_uploads_the_whole_checkpoint(tmp_path):
    rotated = []

    def first_checkpoint_rotated_away():  # the fake reads checkpoint-1's upload only once rotation deleted it
        if hub.calls:
            return True
        rotated[:] = [not os.path.exists(tmp_path / "checkpoint-1")]
        return rotated[0]

    hub = FakeHub(wait_for=first_checkpoint_rotated_away)
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", uploader=uploader(hub))
    train(tmp_path, callback, save_total_limit=1)
    assert rotated == [True]  # checkpoint-1 was deleted before its upload read it
    assert [name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")] == ["checkpoint-3"]
    assert (
        callback.upload_report["uploaded"][0] == "checkpoint-1"
        and callback.upload_report["uploaded"][-1] == "checkpoint-3"
    )
    assert callback.upload_report["counts"]["failed"] == 0
    first = hub.calls[0]["files"]
    assert {f"last-checkpoint/{name}" for name in RESUME | MODEL} <= set(first)
    assert first["last-checkpoint/model.safetensors"] == first["model.safetensors"]
    with open(tmp_path / "checkpoint-3" / "trainer_state.json", "rb") as file:
        assert hub.repo["last-checkpoint/trainer_state.json"] == hashlib.sha256(file.read()).digest()


def test_permanent_failure_leaves_training_running(tmp_path, caplog):
    hub = FakeHub(failures=float("inf"))
    callback = ModelCardCallback(
        RECIPE, hub_model_id="me/sc2-test", hub_strategy="all_checkpoints", uploader=uploader(hub, retries=1)
    )
    with caplog.at_level(logging.ERROR, logger="starcoder2_train"):
        trainer = train(tmp_path, callback)
    assert trainer.state.global_step == 3
    report = callback.upload_report
    assert report["counts"]["failed"] + report["counts"]["skipped"] == 3 and report["counts"]["uploaded"] == 0
    assert "checkpoint-3" in report["failed"] and "503 Service Unavailable" in report["failed"]["checkpoint-3"]
    assert "hub upload of checkpoint-3 failed after 2 attempts: ConnectionError: 503" in caplog.text


def test_checkpoint_strategy_can_resume_from_its_dry_run(tmp_path, tokenizer):
    dry = tmp_path / "dry"
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="checkpoint", dry_run_dir=str(dry))
    train(tmp_path / "run", callback, tokenizer=tokenizer)
    assert callback.upload_report["counts"]["failed"] == 0 and callback.upload_report["uploaded"][-1] == "checkpoint-3"
    repo = dry / "main"
    assert MODEL | TOKENIZER <= set(os.listdir(repo)) and not (RESUME - {"trainer_state.json"}) & set(os.listdir(repo))
    last = repo / "last-checkpoint"
    assert RESUME | MODEL <= set(os.listdir(last))
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 3
    commits = [json.loads(line) for line in (dry / "commits.jsonl").read_text().splitlines()]
    assert commits[-1]["message"] == "Training in progress, step 3, checkpoint"

    # The uploaded copy is what a resume needs: the Trainer restores step, optimizer, scheduler and RNG from it.
    resumed = Trainer(
        model=tiny_model(),
        args=TrainingArguments(
            output_dir=str(tmp_path / "resumed"),
            max_steps=4,
            per_device_train_batch_size=2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
        ),
        train_dataset=Windows(8),
    )
    resumed.train(resume_from_checkpoint=str(last))
    assert resumed.state.global_step == 4
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert optimizer["state"]  # Adam moments, not only weights


def test_every_save_pushes_model_tokenizer_and_card(tmp_path, tokenizer):
    hub = FakeHub()
    callback = ModelCardCallback(RECIPE, hub_model_id="me/sc2-test", hub_strategy="every_save", uploader=uploader(hub))
    train(tmp_path, callback, tokenizer=tokenizer)
    assert [call["message"] for call in hub.calls][-1] == "Training in progress, step 3"
    assert callback.upload_report["counts"]["uploaded"] == len(hub.calls) >= 2
    for call in hub.calls:
        assert MODEL | TOKENIZER <= set(call["files"])
        assert not [path for path in call["files"] if path.endswith((".pt", ".pth", ".bin")) or "/" in path]
    with open(tmp_path / "checkpoint-3" / "model.safetensors", "rb") as file:
        assert hub.repo["model.safetensors"] == hashlib.sha256(file.read()).digest()

"""PII redaction: emails, IP addresses, keys and passwords in code and comments become placeholders, counted by kind;
ordinary code (hashes, versions, UUIDs, this Python's standard library) is left alone; a token-classification model
plugs in by path."""

import pickle
import re

import numpy as np
import pytest
from conftest import random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments
from starcoder2_train.data.filters.pii import PRIVATE_IPV4, PRIVATE_IPV6, PiiRedactor, redact_files, rule_spans

GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
SECRET_FILE = f'''#!/usr/bin/env python
# Maintainer: Jane Roe <jane.roe@corp-mail.com>, reachable from 93.184.216.34
"""Deploys to 2606:2800:220:1:248:1893:25c8:1946; write to ops-team@corp-mail.com."""
AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLF"
aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY9'
token = "{GITHUB_TOKEN}"
DATABASE = "postgres://admin:Tr0ub4dor3@db.corp-mail.com:5432/app"
password = "correct-horse-9"
config = {{"db_password": "s3cr3t-Pa55"}}
# password: hunter2x
'''
PLACEHOLDERS = ("<EMAIL>", "<KEY>", "<PASSWORD>")


def test_each_kind_is_redacted_in_code_and_comments():
    text, counts = PiiRedactor().redact(SECRET_FILE)
    assert counts == {"email": 2, "ip_address": 2, "key": 3, "password": 4}
    for secret in (
        "jane.roe@corp-mail.com",
        "ops-team@corp-mail.com",
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
        "AKIAIOSFODNN7EXAMPLF",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY9",
        GITHUB_TOKEN,
        "Tr0ub4dor3",
        "correct-horse-9",
        "s3cr3t-Pa55",
        "hunter2x",
    ):
        assert secret not in text, secret
    assert "Maintainer: Jane Roe <<EMAIL>>" in text and 'password = "<PASSWORD>"' in text
    assert "postgres://admin:<PASSWORD>@db.corp-mail.com" in text and 'token = "<KEY>"' in text
    public_v4 = re.search(r"reachable from (\S+)", text).group(1)
    public_v6 = re.search(r"Deploys to (\S+);", text).group(1)
    assert public_v4 in PRIVATE_IPV4 and public_v6 in PRIVATE_IPV6  # the same version, a private address
    assert PiiRedactor().redact(SECRET_FILE)[0] == text  # stable: the same text gives the same replacements


def test_private_addresses_documentation_and_ordinary_code_are_kept():
    kept = """
HOST = "192.168.1.20"          # private
LOOPBACK = "127.0.0.1"; ANY = "0.0.0.0"; LINK = "fe80::1"
DOCS = ["192.0.2.7", "198.51.100.23", "203.0.113.9", "2001:db8::42"]   # documentation ranges
DNS = "8.8.8.8"                 # a public resolver
contact = "someone@example.com"  # a documentation domain
__version__ = "2.7.18.1"
RELEASE = "v3.10.4.2"
OID = "1.3.6.1.4.1.311"
digest = hashlib.sha256(data).hexdigest()  # "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
sha1 = "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12"
request_id = "123e4567-e89b-12d3-a456-426614174000"
api_key = os.environ["API_KEY"]
token = "${GITHUB_TOKEN}"
password = get_password()
password = ""
password = "********"
prompt = "Password: "
values = a[1::2]; std::max(a, b)
time = "12:30:45"; mac = "00:1a:2b:3c:4d:5e"
matrix = x @ self.weight
"""
    assert rule_spans(kept) == [], [kept[s:e] for s, e, *_ in rule_spans(kept)]


STDLIB_MAX_SHARE = 0.12  # of this Python's standard library files changed by any rule (measured: 10.4%)
STDLIB_MAX_SHARE_NOT_EMAIL = 0.02  # changed by a rule other than email (measured: 1.2%, most in test suites)


@pytest.fixture(scope="module")
def stdlib_files(tmp_path_factory):
    import pyarrow.parquet as pq

    from starcoder2_train.data.sources.local.ingest import ingest

    output = tmp_path_factory.mktemp("stdlib")
    summary, _ = ingest([], str(output))
    files = [
        file
        for shard in summary["shards"]
        for row in pq.read_table(output / shard).to_pylist()
        for file in row["files"]
    ]
    assert len(files) > 1000
    return files


def test_ordinary_code_of_the_standard_library_is_rarely_changed(stdlib_files):
    """What changes are author emails of module headers and test fixtures' addresses; no hash, version or UUID."""
    changed, not_email, values = 0, 0, []
    for file in stdlib_files:
        spans = rule_spans(file["content"])
        changed += bool(spans)
        not_email += any(kind != "email" for _, _, kind, _ in spans)
        values += [file["content"][start:end] for start, end, kind, _ in spans if kind != "email"]
    assert changed / len(stdlib_files) < STDLIB_MAX_SHARE, changed
    assert not_email / len(stdlib_files) < STDLIB_MAX_SHARE_NOT_EMAIL, not_email
    hex_digest = re.compile(r"[0-9a-fA-F]{32,128}")
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
    version = re.compile(r"\d+\.\d+\.\d+")  # x.y.z: three parts, never an IPv4 address
    assert not [v for v in values if hex_digest.fullmatch(v) or uuid.fullmatch(v) or version.fullmatch(v)]


def test_the_pipeline_redacts_and_counts_on_both_paths(tmp_path, tokenizer, tokenizer_dir):
    from conftest import load_script

    from starcoder2_train.data.pipeline import build_packed_dataset, load_token_rows
    from starcoder2_train.data.store.prepared import open_store, prepared_skips

    repositories = random_repositories(12, seed=4)
    repositories[3]["files"][0]["content"] += SECRET_FILE
    repositories[7]["files"].append({"path": "deploy.py", "content": SECRET_FILE, "language": "Python"})
    shards = write_repository_shards(tmp_path / "shards", repositories)
    args = DataArguments(  # no FIM: a placeholder stays whole in the decoded text
        dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir, pii_redaction=True, fim_rate=0.0, num_proc=2
    )
    rows, skips = load_token_rows(args, tokenizer, seed=42)
    expected = {"email": 4, "ip_address": 4, "key": 6, "password": 8, "files with a redaction": 2}
    assert dict(skips.redactions) == expected
    decoded = tokenizer.decode(np.concatenate(rows["input_ids"]).tolist())
    assert "jane.roe@corp-mail.com" not in decoded and "correct-horse-9" not in decoded and GITHUB_TOKEN not in decoded
    assert decoded.count("<PASSWORD>") == 8 and decoded.count("<EMAIL>") == 4
    _, report = build_packed_dataset(args, tokenizer, seed=42)
    assert {k: v for k, v in report.skipped.items() if k.startswith("redactions: ")} == {
        f"redactions: {kind}": count for kind, count in expected.items()
    }
    assert "redacted (pii_redaction):" in report.summary_lines()
    off, _ = load_token_rows(
        DataArguments(dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir), tokenizer, 42
    )
    assert off._fingerprint != rows._fingerprint  # another cache
    # prepare_data.py: the same counts as datatrove stats, the same tokens.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_config: test\ndataset_name_or_path: {shards}\ntokenizer_name_or_path: {tokenizer_dir}\n"
        f"pii_redaction: true\nfim_rate: 0.0\noutput_dir: {tmp_path / 'o'}\n"
    )
    load_script("prepare_data").main([str(recipe), "--output", str(tmp_path / "p"), "--tasks", "2", "--workers", "1"])
    assert dict(prepared_skips(str(tmp_path / "p")).redactions) == expected
    # Without FIM the tokens are stored once (data/store/pieces.py): epoch 0 holds the redacted text, not the secrets.
    stream = open_store(str(tmp_path / "p"), "train", 0, args, 42)
    assert stream.num_examples == len(rows)
    prepared = tokenizer.decode(stream.tokens(0, stream.num_tokens).tolist())
    assert all(secret not in prepared for secret in ("jane.roe@corp-mail.com", "correct-horse-9", GITHUB_TOKEN))
    assert prepared.count("<PASSWORD>") == 8 and prepared.count("<EMAIL>") == 4


@pytest.fixture(scope="module")
def name_model(tmp_path_factory, tokenizer):
    """A tiny token-classification model saved locally that tags every token I-NAME (its bias says so)."""
    import torch
    from transformers import Starcoder2Config, Starcoder2ForTokenClassification

    labels = {0: "O", 1: "B-NAME", 2: "I-NAME"}
    config = Starcoder2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    model = Starcoder2ForTokenClassification(config)
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    path = tmp_path_factory.mktemp("name-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_token_classification_model_plugs_in_by_path(name_model):
    redactor = PiiRedactor(name_model)
    text, counts = redactor.redact("written by Jane Roe")
    assert text == "<NAME>" and counts == {"name": 1}
    long_text = "\n".join(f"line {i} of a long text" for i in range(200))  # chunks, offsets kept
    text, counts = redactor.redact(long_text)
    assert counts["name"] > 1 and set(text.replace("\n", "")) <= set("<NAME>")
    # What travels into a worker: the path, not the loaded model; the copy loads it again when first used.
    copy = pickle.loads(pickle.dumps(redactor))
    assert copy.model._pipeline is None and len(pickle.dumps(redactor)) < 2000
    files = [{"path": "a.py", "content": "by Jane Roe"}, {"path": "b.py", "content": ""}]
    assert redact_files(files, copy) == {"name": 1, "files with a redaction": 1}
    assert files[0]["content"] == "<NAME>"


def test_a_single_word_entity_is_not_a_name(name_model):
    assert PiiRedactor(name_model).redact("Jane") == ("Jane", {})


def test_the_model_key_needs_pii_redaction():
    from starcoder2_train.configs import RecipeError

    with pytest.raises(RecipeError, match="pii_model_path: is set but pii_redaction is false"):
        DataArguments(dataset_name_or_path="x", pii_model_path="models/starpii")
    assert all(placeholder.startswith("<") for placeholder in PLACEHOLDERS)

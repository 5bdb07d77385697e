"""The data: Stack v2-format parquet shards → repository examples → FIM → token ids → packed windows → batches.

Read it top to bottom in the order a sample takes: `special_tokens` (the structure tokens and their ids, and
IGNORE_INDEX), `languages` and `skips` (what a file is and why one is left out), `shards` (reading and
filtering parquet), `splits` (held-out repositories, one machine's part), `repo_examples` (a repository as one
example), `fim` (file-level Fill-in-the-Middle), `tokenization` (pieces → ids with special-token parsing
off), `pipeline` (those steps as one cached `datasets.map`, and the data epochs), `packing` (fixed windows,
nothing dropped), `collators` (windows → the batch an attention kernel needs), `prepared` (token rows
written ahead by scripts/prepare_data.py). `tokenizer` trains and loads the tokenizer; `local/` turns
folders on disk into shards. May import `configs` only: nothing of model/, training/ or later.
"""

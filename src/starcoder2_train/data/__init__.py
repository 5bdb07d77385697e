"""The data: Stack v2-format parquet shards → repository examples → FIM → token ids → packed windows → batches.

Read it top to bottom in the order a sample takes: `special_tokens` (the structure tokens and their ids, and
IGNORE_INDEX), `languages` and `skips` (what a file is and why one is left out), `shards` (reading and
filtering parquet, with `opt_outs` and `decontamination`: StarCoder2's opt-outs and benchmark decontamination),
`cleaning` (then `near_dedup`, MinHash over files, and `pii`, PII redaction), `splits` (held-out repositories,
one machine's part), `repo_examples` (a repository as one
example), `fim` (file-level Fill-in-the-Middle), `tokenization` (pieces → ids with special-token parsing
off), `pipeline` (those steps as one cached `datasets.map`, and the data epochs, made as training reaches them by
`epochs`), `token_store` and
`token_writer` (token ids as memory-mapped files, read in place by every rank), `permutation` (the window
order in O(1) memory), `packing` (fixed windows, nothing dropped), `collators` (windows → the batch an
attention kernel needs). Before training: `download/` (file contents from Software Heritage), `local/`
(folders on disk → shards), `tokenizer` (train and load the tokenizer), `prepare` (the same steps as
datatrove tasks, writing token stores) and `prepared` (their layout, opened by training). May import
`configs` only: nothing of model/, training/ or later.
"""

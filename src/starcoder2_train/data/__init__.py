"""The data, in the order a sample takes, one subpackage per stage:

    sources/  → filters/ → examples/ → tokens/ → store/ → windows/ → batches/

- `sources/`: where repositories come from: Stack v2-format parquet shards (`shards`: find, recognise the layout,
  read, filter each batch as it is read with filters/files, group by repository), `languages` (a file's language
  from its path), `download/` (file contents from Software Heritage), `local/` (folders on disk → shards),
  `documents` (document tables: parquet or JSONL with a `content` column, one document a row) and
  `document_reader` (its datatrove reader step for prepare_data.py).
- `filters/`: what is kept: `files` (per repository and file: opt-outs, languages, licenses, vendor, generated,
  size, encoding, then `decontamination`; `opt_outs` reads the list), `cleaning` (then `near_dedup`, MinHash over
  files, and `pii`, PII redaction), `splits` (held-out repositories, one machine's part).
- `examples/`: a repository as one example (`repo_examples`) and file-level Fill-in-the-Middle (`fim`, with the
  window-level FIM that windows/ applies).
- `tokens/`: `tokenizer` (train and load it), `tokenization` (pieces → ids with special-token parsing off).
- `store/`: token ids as memory-mapped files read in place by every rank (`token_store`, `token_writer`), tokens
  stored once as pieces with a record table (`pieces`), the prepared directory's layout (`prepared`) and what it
  holds (`manifest`: tokenizer, data keys, tasks done, checked before training).
- `windows/`: `permutation` (the window order in O(1) memory), `assembly` (a data epoch of tokens stored once,
  rendered while reading through a per-epoch index), `packing` (fixed windows, nothing dropped), `epochs` (data
  epochs made as training reaches them), `mixture` (windows drawn from the sources by weight).
- `batches/`: `collators` (windows → the batch an attention kernel needs).

Shared by every stage, at this level: `special_tokens` (the structure tokens, their ids, IGNORE_INDEX), `skips`
(every file, repository or parquet file left out, with its reason) and `report` (what a run's data holds and left
out, per source). Two modules run the stages end to end: `pipeline` (in process, one cached `datasets.map`, for
training and inspect_data.py) and `prepare` (the same steps as datatrove tasks writing token stores, for
prepare_data.py), whose tokenizing and writing steps are `prepare_pieces` (tokens stored once) and `prepare_epochs`
(a copy per data epoch, with file-level FIM); its executors beside it (`slurm_executor`, `ray_executor`). May
import `configs` only: nothing of model/, training/ or later.
"""

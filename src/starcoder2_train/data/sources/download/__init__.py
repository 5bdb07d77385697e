"""The Stack v2 contents: -ids parquet (blob ids per repository) → blobs from S3 → per-repository shards.

In the order a repository takes: `ids` (read and check the ids, cut them into deterministic chunks, one
machine's part), `fetch` (one blob from Software Heritage's bucket or a mirror: retried, gunzipped, every
failure a reason), `run` (a thread pool fetches each chunk, files are decoded as their src_encoding says,
each chunk is written as one shard atomically, and a rerun resumes where a run stopped), `verify` (each shard
against its record's size, row count and sha256: on resume, and before preparation reads the folder). The
shards read as `dataset_name_or_path: DIR` (data/sources/shards.py). scripts/download_stack_v2.py runs it. May import
`configs` and `data/` (shards, skips).

Cost at the scale of the-stack-v2-train-smol-ids (~3.3M repositories, hundreds of millions of blobs): one GET
per distinct blob of a chunk, one chunk's contents in memory, ~3,300 shards. One process fetches at most
~650 blobs/s (~1.5 ms of client CPU per blob, fetch.py), so 300M blobs take one process ~5 days and 64
processes (--num_shards 64) ~2 hours, if the bucket keeps up (S3 serves at least 5,500 GETs/s per partitioned
prefix; SlowDown answers past that are retried with backoff).
"""

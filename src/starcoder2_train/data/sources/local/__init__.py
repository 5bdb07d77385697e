"""Local code as Stack v2-format shards: folders, git checkouts or this Python's standard library.

`ingest` walks the folders and writes per-repository parquet (scripts/ingest.py); `metadata` names a
repository after its git remote and detects its license from its license files. Used before training, never
during it. May import `configs` and `data/` (skips, languages).
"""

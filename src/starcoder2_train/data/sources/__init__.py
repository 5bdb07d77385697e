"""Stage 1, where repositories come from: parquet shards (`shards`), file languages (`languages`), Software Heritage
downloads (`download/`) and folders on disk (`local/`).
"""

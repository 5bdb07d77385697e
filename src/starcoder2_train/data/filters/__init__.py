"""Stage 2, what is kept: the file filters (`files`: opt-outs, languages, licenses, size, ..., benchmark
decontamination), cleaning (near-deduplication, PII redaction) and the held-out split (`splits`).
"""

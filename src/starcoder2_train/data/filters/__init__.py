"""Stage 2, what is kept: opt-outs, benchmark decontamination, cleaning (near-deduplication, PII redaction) and the
held-out split (`splits`).
"""

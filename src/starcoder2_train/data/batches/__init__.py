"""Stage 7, windows → batches for the attention kernel (`collators`)."""

"""Stage 4, examples as token ids: the tokenizer (`tokenizer`) and pieces → ids with special-token parsing off
(`tokenization`).
"""

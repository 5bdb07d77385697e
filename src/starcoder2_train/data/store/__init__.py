"""Stage 5, token ids on disk: the memory-mapped token store (`token_store`, `token_writer`) and the prepared directory
(`prepared`).
"""

"""Undo StarCoder2's format on token ids: the test-side inverse of repo_examples + fim + tokenization."""

from starcoder2_train.data.special_tokens import SpecialTokenIds


def split_runs(ids: list[int], special: set) -> list:
    """[special id | list of text ids] runs."""
    runs, text = [], []
    for token in ids:
        if token in special:
            if text:
                runs.append(text)
                text = []
            runs.append(token)
        else:
            text.append(token)
    if text:
        runs.append(text)
    return runs


def undo_example(ids: list[int], tokenizer, ids_of: SpecialTokenIds):
    """(repo_name or None, [file texts as written, header included], [modes]) from one example's ids."""
    special = set(ids_of.as_set())
    runs = split_runs(ids, special)
    decode = lambda run: tokenizer.decode(run) if isinstance(run, list) else None  # noqa: E731
    assert runs[-1] == ids_of.eos, "an example ends with <|endoftext|>"
    repo_name, i = None, 0
    if runs[0] == ids_of.repo_name:
        repo_name, i = decode(runs[1]), 2
    files, modes = [], []
    while i < len(runs) - 1:
        assert runs[i] == ids_of.file_sep, f"expected <file_sep> at run {i}"
        i += 1
        # Collect the runs of this file, up to the next <file_sep> or the final <|endoftext|>.
        body = []
        while i < len(runs) - 1 and runs[i] != ids_of.file_sep:
            body.append(runs[i])
            i += 1

        def text(k, body=body):
            return decode(body[k]) if k < len(body) and isinstance(body[k], list) else ""

        if not body or body[0] != ids_of.fim_prefix:
            files.append(text(0))
            modes.append("plain")
        elif body[1] == ids_of.fim_suffix:  # SPM: <pre><suf>suffix<mid>prefix+middle
            k = 2 if isinstance(body[2], list) else 1
            suffix = text(2) if k == 2 else ""
            rest = text(body.index(ids_of.fim_middle) + 1)
            files.append(rest + suffix)
            modes.append("spm")
        else:  # PSM: <pre>prefix<suf>suffix<mid>middle
            s, m = body.index(ids_of.fim_suffix), body.index(ids_of.fim_middle)
            prefix = text(1) if s == 2 else ""
            suffix = text(s + 1) if m == s + 2 else ""
            middle = text(m + 1)
            files.append(prefix + middle + suffix)
            modes.append("psm")
    return repo_name, files, modes

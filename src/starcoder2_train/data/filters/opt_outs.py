"""Opt-outs: the repositories whose owners asked to be left out (`exclude_repositories`), removed first.

The list is a file of `owner/name` lines (blank lines and `#` comments ignored; a GitHub URL is read as its
owner/name) or a Hub dataset with a `repo_name` (or `repository`, `name`) column. Names are compared without
case, as GitHub compares them. data/filters/files.py removes an opted-out repository before any other check, so
none of its files is read, decoded or counted under another reason: the repository is counted once, as opted out.

Cost per worker: one Python set of the names, about 100 bytes a name (a list of 100,000 repositories: 10 MB),
built once when the list is read and again once in each worker that unpickles it, never per batch.
"""

import logging
import os
import re

from starcoder2_train.configs import RecipeError, hub_hint, is_hub_id

logger = logging.getLogger(__name__)
NAME_COLUMNS = ("repo_name", "repository", "name")
_URL_PREFIX = re.compile(r"^(?:https?://)?(?:www\.)?github\.com/", re.I)
_OWNER_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def normalise_name(name: str) -> str:
    """`owner/name` in lower case, from a name or a GitHub URL (`https://github.com/Owner/Name.git`)."""
    name = _URL_PREFIX.sub("", name.strip()).rstrip("/")
    return name.removesuffix(".git").lower()


class OptOuts:
    """A set of repository names; `repo_name in opt_outs`. Pickles as its sorted names (a stable fingerprint)."""

    def __init__(self, names, source: str):
        self.source = source
        self.names = frozenset(normalise_name(name) for name in names)

    def __contains__(self, repo_name: str) -> bool:
        return normalise_name(repo_name) in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):
        return {"source": self.source, "names": sorted(self.names)}

    def __setstate__(self, state):
        self.source, self.names = state["source"], frozenset(state["names"])


def _read_file(path: str) -> list[str]:
    names = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not _OWNER_NAME.fullmatch(normalise_name(line)):
                raise RecipeError(
                    f"exclude_repositories: {path} line {number}: {line!r} is not a repository name; write one "
                    "owner/name (or GitHub URL) per line."
                )
            names.append(line)
    return names


def _read_hub_dataset(dataset_id: str) -> list[str]:
    import datasets

    try:
        table = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # noqa: BLE001 - offline, missing, gated: all say the same thing to the user
        raise RecipeError(
            f"exclude_repositories: {dataset_id} is not a file on this machine, and loading it as a Hub dataset "
            f"failed ({type(error).__name__}); {hub_hint(dataset_id)}."
        ) from error
    column = next((name for name in NAME_COLUMNS if name in table.column_names), None)
    if column is None:
        raise RecipeError(
            f"exclude_repositories: the Hub dataset {dataset_id} has no column {' or '.join(NAME_COLUMNS)} "
            f"(its columns: {', '.join(table.column_names)})."
        )
    return [name for name in table[column] if name]


def load_opt_outs(source: str | None) -> OptOuts | None:
    """The opt-out list of `exclude_repositories`, or None when unset; RecipeError naming the key when unreadable."""
    if source is None:
        return None
    if os.path.isfile(source):
        names = _read_file(source)
    elif is_hub_id(source):
        names = _read_hub_dataset(source)
    else:
        raise RecipeError(
            f"exclude_repositories: {source}: no such file; give a file of owner/name lines or a Hub dataset id."
        )
    if not names:
        logger.warning("exclude_repositories: %s names no repository; nothing is opted out.", source)
    return OptOuts(names, source)

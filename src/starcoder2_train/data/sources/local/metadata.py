"""A local repository's name and license, as The Stack v2 records them.

Name: `owner/name` after its git remote (origin first) in .git/config (worktrees and submodules included),
else the folder's name.

License mapping. The Stack v2 has license_type "permissive" or "no_license" only: files under
copyleft licenses were removed from it. Here a LICENSE/LICENCE/COPYING/UNLICENSE file in the
repository root is matched against a few well-known texts: MIT, Apache-2.0, BSD-2/3-Clause, ISC,
0BSD, Zlib, Unlicense, BSL-1.0, PSF-2.0 and CC0-1.0 give "permissive"; GPL, LGPL, AGPL, MPL-2.0 and
EPL (copyleft, MPL included as file-level copyleft) give "non_permissive", a value The Stack v2 never
holds, so that `license_types: [permissive, no_license]` leaves them out. When any copyleft text is
found the repository is "non_permissive". No license file, or none recognised: "no_license".
"""

import os
import re

from starcoder2_train.data.skips import SkipReport

LICENSE_FILE = re.compile(r"(licen[cs]e|copying|unlicense)([.\-_][\w.\-]*)?", re.I)
PERMISSIVE = "permissive"
NON_PERMISSIVE = "non_permissive"
NO_LICENSE = "no_license"
_BSD = r"Redistribution and use in source and binary forms"
_ISC = r"distribute this software for any purpose with or without fee is hereby granted"


# (SPDX id, license_type, pattern over the text with runs of white space made single spaces)
LICENSE_TEXTS = [
    ("AGPL-3.0", NON_PERMISSIVE, r"GNU AFFERO GENERAL PUBLIC LICENSE"),
    ("LGPL", NON_PERMISSIVE, r"GNU LESSER GENERAL PUBLIC LICENSE|GNU LIBRARY GENERAL PUBLIC LICENSE"),
    ("GPL", NON_PERMISSIVE, r"GNU GENERAL PUBLIC LICENSE"),
    ("MPL-2.0", NON_PERMISSIVE, r"Mozilla Public License,? (Version|v\.?) ?2\.0"),
    ("EPL", NON_PERMISSIVE, r"Eclipse Public License"),
    ("MIT", PERMISSIVE, r"Permission is hereby granted, free of charge, to any person obtaining a copy"),
    ("Apache-2.0", PERMISSIVE, r"Apache License,? Version 2\.0"),
    ("BSD-3-Clause", PERMISSIVE, _BSD + r".*(Neither the name|endorse or promote)"),
    ("BSD-2-Clause", PERMISSIVE, _BSD + r"(?!.*(Neither the name|endorse or promote))"),
    ("ISC", PERMISSIVE, _ISC + r", provided that"),
    ("0BSD", PERMISSIVE, _ISC + r"\. "),
    ("Zlib", PERMISSIVE, r"This software is provided 'as-is', without any express or implied warranty"),
    ("Unlicense", PERMISSIVE, r"This is free and unencumbered software released into the public domain"),
    ("BSL-1.0", PERMISSIVE, r"Boost Software License"),
    ("PSF-2.0", PERMISSIVE, r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"),
    ("CC0-1.0", PERMISSIVE, r"CC0 1\.0 Universal"),
]


def detect_licenses(directory: str, report: SkipReport) -> tuple[str, list[str]]:
    """(license_type, SPDX ids) from the license files in `directory` (not its sub-directories)."""
    found = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if LICENSE_FILE.fullmatch(name) and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    text = " ".join(handle.read(200_000).split())
            except OSError as error:
                report.details.append(f"license file unreadable (taken as no_license): {path} ({error.strerror})")
                continue
            matches = [(spdx, kind) for spdx, kind, pattern in LICENSE_TEXTS if re.search(pattern, text)]
            if not matches:
                report.details.append(f"license file not recognised (taken as no_license): {path}")
            found += [match for match in matches if match not in found]
    kinds = {kind for _, kind in found}
    license_type = NON_PERMISSIVE if NON_PERMISSIVE in kinds else PERMISSIVE if kinds else NO_LICENSE
    return license_type, [spdx for spdx, _ in found]


def repository_name(root: str) -> str:
    """`owner/name` from the git remote (origin first) in .git/config, else the folder's name."""
    remotes = {}
    config = _git_config_path(root)
    if config is not None and os.path.isfile(config):
        remote = None
        with open(config, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                section = re.match(r'\s*\[\s*remote\s+"([^"]+)"\s*\]', line)
                if section or line.lstrip().startswith("["):
                    remote = section.group(1) if section else None
                elif remote and (url := re.match(r"\s*url\s*=\s*(\S+)", line)):
                    remotes.setdefault(remote, url.group(1))
    for url in sorted(remotes.values(), key=lambda url: url != remotes.get("origin")):
        if "://" in url or re.match(r"[\w.-]+@[\w.-]+:", url):  # a URL, not a path on this machine
            parts = [part for part in re.split(r"[/:]", url.removesuffix("/").removesuffix(".git")) if part]
            if len(parts) >= 2:
                return f"{parts[-2]}/{parts[-1]}"
    return os.path.basename(os.path.abspath(root))


def _git_config_path(root: str) -> str | None:
    git = os.path.join(root, ".git")
    if os.path.isdir(git):
        return os.path.join(git, "config")
    if not os.path.isfile(git):  # a worktree or submodule has a .git file: "gitdir: <path>"
        return None
    with open(git, encoding="utf-8", errors="replace") as handle:
        match = re.match(r"gitdir:\s*(.+)", handle.read())
    if match is None:
        return None
    gitdir = os.path.join(root, match.group(1).strip())
    commondir = os.path.join(gitdir, "commondir")
    if os.path.isfile(commondir):
        with open(commondir) as handle:
            gitdir = os.path.join(gitdir, handle.read().strip())
    return os.path.join(gitdir, "config")

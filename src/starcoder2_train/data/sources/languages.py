"""File name → The Stack v2 `language` name (GitHub Linguist spelling), for files that carry no language.

The Stack v2 takes its `language` column from go-enry, which follows GitHub Linguist, so the names
here use Linguist's spelling ("C++", "C#", "Shell", "Jupyter Notebook"). Linguist also reads file
contents to settle ambiguous extensions (`.h`: C, C++ or Objective-C); this map does not, and
takes the most common reading (`.h` → C).

`SMOL_LANGUAGES` are the 17 languages of the-stack-v2-train-smol as this project understands them.
UNVERIFIED: the dataset card says "17 programming languages" without listing them in any source
we could consult offline; the list below is the one given to this project. Some summaries of the
StarCoder2 paper name Lua and R among them instead of SQL or Markdown; check the paper's data
tables before relying on the exact set.
"""

import os

SMOL_LANGUAGES = (
    "Python",
    "Java",
    "JavaScript",
    "TypeScript",
    "C",
    "C++",
    "C#",
    "Go",
    "PHP",
    "Ruby",
    "Rust",
    "Swift",
    "Kotlin",
    "Scala",
    "Shell",
    "SQL",
    "Markdown",
)

# Lower-case extension (with its dot) → language.
EXTENSIONS = {
    # the-stack-v2-train-smol languages
    ".py": "Python",
    ".pyi": "Python",
    ".pyw": "Python",
    ".java": "Java",
    ".js": "JavaScript",
    ".mjs": "JavaScript",
    ".cjs": "JavaScript",
    ".jsx": "JavaScript",
    ".ts": "TypeScript",
    ".mts": "TypeScript",
    ".cts": "TypeScript",
    ".tsx": "TSX",
    ".c": "C",
    ".h": "C",
    ".cc": "C++",
    ".cpp": "C++",
    ".cxx": "C++",
    ".c++": "C++",
    ".hh": "C++",
    ".hpp": "C++",
    ".hxx": "C++",
    ".h++": "C++",
    ".inl": "C++",
    ".ipp": "C++",
    ".cs": "C#",
    ".go": "Go",
    ".php": "PHP",
    ".rb": "Ruby",
    ".rake": "Ruby",
    ".gemspec": "Ruby",
    ".rs": "Rust",
    ".swift": "Swift",
    ".kt": "Kotlin",
    ".kts": "Kotlin",
    ".scala": "Scala",
    ".sc": "Scala",
    ".sh": "Shell",
    ".bash": "Shell",
    ".zsh": "Shell",
    ".ksh": "Shell",
    ".sql": "SQL",
    ".md": "Markdown",
    ".markdown": "Markdown",
    # common extras
    ".html": "HTML",
    ".htm": "HTML",
    ".css": "CSS",
    ".scss": "SCSS",
    ".sass": "Sass",
    ".less": "Less",
    ".yaml": "YAML",
    ".yml": "YAML",
    ".json": "JSON",
    ".toml": "TOML",
    ".xml": "XML",
    ".ipynb": "Jupyter Notebook",
    ".lua": "Lua",
    ".r": "R",
    ".pl": "Perl",
    ".pm": "Perl",
    ".hs": "Haskell",
    ".jl": "Julia",
    ".dart": "Dart",
    ".m": "Objective-C",
    ".mm": "Objective-C++",
    ".cu": "Cuda",
    ".cuh": "Cuda",
    ".f90": "Fortran",
    ".f": "Fortran",
    ".groovy": "Groovy",
    ".gradle": "Groovy",
    ".ex": "Elixir",
    ".exs": "Elixir",
    ".erl": "Erlang",
    ".ml": "OCaml",
    ".mli": "OCaml",
    ".fs": "F#",
    ".clj": "Clojure",
    ".el": "Emacs Lisp",
    ".lisp": "Common Lisp",
    ".scm": "Scheme",
    ".rkt": "Racket",
    ".zig": "Zig",
    ".nim": "Nim",
    ".v": "Verilog",
    ".vhd": "VHDL",
    ".ps1": "PowerShell",
    ".bat": "Batchfile",
    ".cmd": "Batchfile",
    ".vue": "Vue",
    ".svelte": "Svelte",
    ".proto": "Protocol Buffer",
    ".cmake": "CMake",
    ".tex": "TeX",
    ".rst": "reStructuredText",
    ".asm": "Assembly",
    ".s": "Unix Assembly",
    ".sol": "Solidity",
    ".nix": "Nix",
    ".tf": "HCL",
}

# Exact file names that decide the language on their own.
FILENAMES = {
    "Dockerfile": "Dockerfile",
    "Containerfile": "Dockerfile",
    "Makefile": "Makefile",
    "makefile": "Makefile",
    "GNUmakefile": "Makefile",
    "CMakeLists.txt": "CMake",
    "Rakefile": "Ruby",
    "Gemfile": "Ruby",
    "BUILD.bazel": "Starlark",
    "WORKSPACE": "Starlark",
    ".bashrc": "Shell",
    ".bash_profile": "Shell",
    ".zshrc": "Shell",
    ".profile": "Shell",
}


def language_of(path: str) -> str | None:
    """The Stack v2 language of a file, from its name alone; None when the name says nothing."""
    name = os.path.basename(path)
    if name in FILENAMES:
        return FILENAMES[name]
    if name.startswith("Dockerfile."):  # Dockerfile.dev, Dockerfile.gpu, ...
        return "Dockerfile"
    _, extension = os.path.splitext(name)
    return EXTENSIONS.get(extension.lower())

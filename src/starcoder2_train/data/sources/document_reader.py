"""datatrove's reader step for a document source (data/sources/documents.py says what a document is).

`DocumentReader(files, structure_tokens)`: the files split across tasks in contiguous parts (task r of w reads
files [r·n/w, (r+1)·n/w)), every file checked for a text `content` column before it is read (a bad file refused by
name), each non-empty row one datatrove Document in the shape data/prepare.py's RepositoryReader gives a repository:
`Document(text=content, id="<file name>:<row>", metadata={"files": [], "split": "train", "document": True,
"structure_tokens": [...]})`. The tokenizer step turns it into `document_pieces(text, structure_tokens)` through
PieceTokenizer. Empty rows are counted as `files: empty content`, kept documents as `train documents`.
"""

import os

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.data.skips import EMPTY
from starcoder2_train.data.sources.documents import check_document_file, read_contents


class DocumentReader(PipelineStep):
    """Document files → one Document per non-empty row (see the module docstring)."""

    name, type = "documents", "📖 - READER"

    def __init__(self, files: list[str], structure_tokens=()):
        super().__init__()
        self.files, self.structure_tokens = list(files), list(structure_tokens or ())

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        count = len(self.files)
        for path in self.files[rank * count // world_size : (rank + 1) * count // world_size]:
            check_document_file(path)
            for row, text in enumerate(read_contents(path)):
                if not text:
                    self.stat_update(f"files: {EMPTY}")
                    continue
                self.stat_update("train documents")
                metadata = {"files": [], "split": "train", "document": True, "structure_tokens": self.structure_tokens}
                yield Document(text=text, id=f"{os.path.basename(path)}:{row}", metadata=metadata)

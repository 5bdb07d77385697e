"""datatrove's reader step for a document source (data/sources/documents.py says what a document is).

`DocumentReader(files, decontamination, report_dir)`: the files split across tasks in contiguous parts (task r of
w reads files [r·n/w, (r+1)·n/w)), every file checked for a text `content` column before it is read (a bad file
refused by name; data/prepare.py checks them all before any task starts), each non-empty row one datatrove Document
in the shape data/prepare.py's RepositoryReader gives a repository of one file, so that near-deduplication and PII
redaction (which act on files) run on it as the in-process path runs them (data/sources/documents.py
`clean_documents`):
`Document(text="", id="<file name>:<row>", metadata={"files": [{"path": id, "content": text, "language": ""}],
"split": "train", "document": True, "key": id})`. data/prepare_pieces.py's RepositoryPieces then encodes its
content (declared structure tokens as ids) as a record of 0 files. Empty rows are counted as `files: empty
content`; a row holding a benchmark's text (`decontamination`: data/filters/decontamination.py's index, or None)
is dropped, counted by benchmark and listed in report_dir (data/store/prepared.py `decontamination_list`).

No held-out split: every document is train, whatever eval_fraction says. The held-out evaluation reads a
mixture's first repository source only (data/pipeline.py `evaluation_data_args`), as the in-process path does, so
documents held out would be lost to training and never evaluated.
"""

import json
import os

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.data.skips import EMPTY, contamination_reason
from starcoder2_train.data.sources.documents import check_document_file, read_contents
from starcoder2_train.data.store.prepared import contiguous_part, decontamination_list


class DocumentReader(PipelineStep):
    """Document files → one Document per kept row (see the module docstring)."""

    name, type = "documents", "📖 - READER"

    def __init__(self, files: list[str], decontamination=None, report_dir: str | None = None):
        super().__init__()
        self.files, self.decontamination, self.report_dir = list(files), decontamination, report_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with decontamination_list(self.report_dir, rank, world_size) as report:
            for path in contiguous_part(self.files, rank, world_size):
                check_document_file(path)
                for row, text in enumerate(read_contents(path)):
                    document = self._document(f"{os.path.basename(path)}:{row}", text, report)
                    if document is not None:
                        yield document

    def _document(self, name: str, text: str | None, report) -> Document | None:
        if not text:
            self.stat_update(f"files: {EMPTY}")
            return None
        match = self.decontamination.find(text) if self.decontamination is not None else None
        if match is not None:
            self.stat_update(f"files: {contamination_reason(match.benchmark)}")
            if report is not None:
                entry = {"repo_name": "", "path": name, "benchmark": match.benchmark, "text": match.name}
                report.write(json.dumps(entry, ensure_ascii=False) + "\n")
            return None
        files = [{"path": name, "content": text, "language": ""}]
        return Document(text="", id=name, metadata={"files": files, "split": "train", "document": True, "key": name})

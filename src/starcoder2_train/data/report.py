"""What the data pipeline saw, made and skipped (`DataReport`): printed by inspect_data and logged by training.

Per source: repositories (documents, for a document source), files, FIM counts, tokens, windows, packing, what
was skipped and why, what PII redaction rewrote. A mixture's report is its first source's, with `sources` (each
source's own DataReport as a dict) and `mixture` (per source: weight, windows read, realised share, tokens, passes;
data/windows/mixture.py `mixture_rows`) beside it.
"""

from dataclasses import asdict, dataclass, field

import datasets

from starcoder2_train.data.skips import SkipReport
from starcoder2_train.data.store.prepared import prepared_skips, prepared_stats
from starcoder2_train.data.windows.mixture import mixture_lines
from starcoder2_train.data.windows.packing import PackedDataset


@dataclass
class DataReport:
    """What the pipeline saw, made and skipped: printed by inspect_data and logged by training."""

    repositories: int = 0
    files: int = 0
    files_fim_psm: int = 0
    files_fim_spm: int = 0
    tokens: int = 0
    windows: int = 0
    padding_tokens: int = 0
    skipped: dict = field(default_factory=dict)  # SkipReport.as_dict(): skips and PII redactions by kind
    # fim_level: window: WindowFimCounts (as a dict) of the first `fim_windows` training windows, and that number
    window_fim: dict | None = None
    fim_windows: int = 0
    contaminated: list = field(default_factory=list)  # the files decontamination removed (not with prepared data)
    kind: str = "repositories"  # or documents (data/sources/documents.py): the first line then counts documents
    sources: dict = field(default_factory=dict)  # a mixture: {name: that source's DataReport as a dict}
    mixture: list = field(default_factory=list)  # a mixture: data/windows/mixture.py mixture_rows

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / max(1, self.tokens + self.padding_tokens)

    @classmethod
    def of(cls, token_rows: datasets.Dataset, packed: PackedDataset, skips: SkipReport) -> "DataReport":
        columns = token_rows.select_columns(["num_files", "num_fim_psm", "num_fim_spm"]).to_pandas().sum()
        return cls(
            repositories=len(token_rows),
            files=int(columns["num_files"]),
            files_fim_psm=int(columns["num_fim_psm"]),
            files_fim_spm=int(columns["num_fim_spm"]),
            tokens=packed.total_tokens,
            windows=len(packed),
            padding_tokens=packed.padding_tokens,
            skipped=skips.as_dict(),
            contaminated=list(skips.contaminated),
        )

    @classmethod
    def of_prepared(cls, directory: str, split: str, store, packed: PackedDataset) -> "DataReport":
        """The report of a prepared store: its datatrove stats (epoch 0's FIM counts) and the packed windows."""
        stats = prepared_stats(directory)  # every task's stats file, read once
        return cls(
            repositories=store.num_examples,
            files=int(stats[f"{split} files"]),
            files_fim_psm=int(stats[f"{split} files FIM PSM"]),
            files_fim_spm=int(stats[f"{split} files FIM SPM"]),
            tokens=packed.total_tokens,
            windows=len(packed),
            padding_tokens=packed.padding_tokens,
            skipped=prepared_skips(directory, stats).as_dict(),
        )

    def with_window_fim(self, packed: PackedDataset, windows: int = 1000) -> "DataReport":
        """The report with what window-level FIM does to the first `windows` windows (when the data has it)."""
        if packed.fim is not None:
            self.fim_windows = min(windows, len(packed))
            self.window_fim = asdict(packed.sample_fim_counts(windows))
        return self

    def fim_line(self) -> str:
        if self.window_fim is None:
            return f"files FIM-transformed: {self.files_fim_psm:,} PSM, {self.files_fim_spm:,} SPM"
        counts = self.window_fim
        return (
            f"FIM per window (fim_level: window), in the first {self.fim_windows:,} windows: {counts['psm']:,} PSM, "
            f"{counts['spm']:,} SPM; left plain: {counts['no_room']:,} without room for the sentinels, "
            f"{counts['split_character']:,} cut inside a character by the window's edge"
        )

    def summary_lines(self) -> list[str]:
        """The report's lines; a mixture's: each source's own lines under its name, then the mixture's shares."""
        if not self.mixture:
            return self._own_lines()
        lines = []
        for name, report in self.sources.items():
            lines.append(f"source {name}:")
            lines += [f"  {line}" for line in DataReport(**report)._own_lines()]
        return lines + mixture_lines(self.mixture)

    def _own_lines(self) -> list[str]:
        lines = [
            f"{self.kind}: {self.repositories:,}",
            f"files: {self.files:,}",
            self.fim_line(),
            f"tokens: {self.tokens:,} in {self.windows:,} windows",
            f"packing efficiency: {100 * self.packing_efficiency:.3f}% real tokens "
            f"({self.padding_tokens:,} padding, 0 dropped)",
        ]
        redacted = [
            f"  {kind[12:]}: {n:,}" for kind, n in sorted(self.skipped.items()) if kind.startswith("redactions: ")
        ]
        skipped = [
            f"  {reason}: {count:,}" for reason, count in sorted(self.skipped.items()) if reason[:12] != "redactions: "
        ]
        lines += ["skipped:"] + skipped if skipped else ["skipped: nothing"]
        return lines + (["redacted (pii_redaction):"] + redacted if redacted else [])

"""StarCoder2's repository-context Fill-in-the-Middle, at two levels (`fim_level`): `apply_fim` cuts whole files
before packing (`file`), `WindowFim` cuts each training window's files where they lie in it (`window`, as
Fast-LLM did). What follows describes the file level; WindowFim says how the window level differs.

A repository example is a FIM candidate with probability `fim_rate`; each file of a candidate is
then transformed with probability `fim_fragment_rate`. A transformed file is cut at two uniform
character positions in [0, len(code)] (sorted; any part may be empty) and written as

    PSM: <fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle
    SPM: <fim_prefix><fim_suffix>suffix<fim_middle>prefix middle    (bigcode Megatron's variant)

chosen with probability `fim_spm_rate` for SPM. In SPM, prefix and middle are two texts, tokenized apart
and their ids concatenated (as bigcode's Megatron and Fast-LLM do), so that the boundary between them in
training is where an inference prompt `<fim_prefix><fim_suffix>suffix<fim_middle>prefix` ends. With
metadata, the file path and its newline belong to the prefix, so they are never cut. `<repo_name>name` is
never transformed. Every random choice comes from `example_rng(seed, epoch, repo_name, "fim")`.
"""

from dataclasses import dataclass

import numpy as np

from starcoder2_train.data.examples.repo_examples import Piece, RepoExample, example_rng
from starcoder2_train.data.special_tokens import EOS_TOKEN, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from starcoder2_train.data.tokens.tokenization import PieceTokenizer


@dataclass(frozen=True)
class FimRates:
    fim_rate: float = 0.5
    fim_fragment_rate: float = 0.5
    fim_spm_rate: float = 0.5

    @classmethod
    def of(cls, data_args) -> "FimRates":
        """The recipe's rates (DataArguments' fim_rate, fim_fragment_rate, fim_spm_rate)."""
        return cls(data_args.fim_rate, data_args.fim_fragment_rate, data_args.fim_spm_rate)


def prepared_rates(data_args) -> FimRates:
    """The rates of the file-level transform that the prepared tokens get: none with `fim_level: window`, whose
    FIM is applied to each window at training time."""
    if data_args.fim_level == "window":
        return FimRates(0.0, 0.0, 0.0)
    return FimRates.of(data_args)


def window_fim(data_args, tokenizer, seed: int, epoch: int):
    """The WindowFim of one data epoch with `fim_level: window`, else None."""
    if data_args.fim_level != "window" or data_args.fim_rate == 0.0:
        return None
    return WindowFim(tokenizer, FimRates.of(data_args), seed, epoch)


@dataclass
class FimResult:
    pieces: list[Piece]
    num_psm: int
    num_spm: int


def fim_file(header: str, content: str, cut_a: int, cut_b: int, spm: bool) -> list[Piece]:
    """One file, FIM-transformed at character positions cut_a <= cut_b of `content`."""
    prefix, middle, suffix = header + content[:cut_a], content[cut_a:cut_b], content[cut_b:]
    if spm:
        return [
            (True, FIM_PREFIX),
            (True, FIM_SUFFIX),
            (False, suffix),
            (True, FIM_MIDDLE),
            (False, prefix),
            (False, middle),
        ]
    return [
        (True, FIM_PREFIX),
        (False, prefix),
        (True, FIM_SUFFIX),
        (False, suffix),
        (True, FIM_MIDDLE),
        (False, middle),
    ]


def apply_fim(example: RepoExample, rates: FimRates, seed: int, epoch: int) -> FimResult:
    """Render `example` as pieces, FIM-transforming files as StarCoder2 did."""
    rng = example_rng(seed, epoch, example.repo_name, "fim")
    candidate = rng.random() < rates.fim_rate
    pieces, num_psm, num_spm = example.head(), 0, 0
    for path, content in example.files:
        pieces.append((True, FILE_SEP))
        header = example.file_header(path)
        if candidate and rng.random() < rates.fim_fragment_rate:
            cut_a, cut_b = sorted((rng.randint(0, len(content)), rng.randint(0, len(content))))
            spm = rng.random() < rates.fim_spm_rate
            pieces += fim_file(header, content, cut_a, cut_b, spm)
            num_spm += spm
            num_psm += not spm
        else:
            pieces.append((False, header + content))
    pieces.append((True, EOS_TOKEN))
    return FimResult(pieces=pieces, num_psm=num_psm, num_spm=num_spm)


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in for each byte (GPT-2's table, which StarCoder2's tokenizer uses):
    printable Latin-1 bytes stand for themselves, the other 68 bytes for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    alphabet = {chr(byte): byte for byte in printable}
    alphabet.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return alphabet


@dataclass
class WindowFimCounts:
    """What the window-level FIM did to the fragments it drew, per window or summed over windows."""

    psm: int = 0
    spm: int = 0
    no_room: int = 0  # drawn, left plain: the window had no room for its sentinels (nothing else is lost)
    split_character: int = 0  # drawn, left plain: the window's edge cuts a multi-byte character of it

    def add(self, other: "WindowFimCounts") -> None:
        self.psm, self.spm = self.psm + other.psm, self.spm + other.spm
        self.no_room, self.split_character = self.no_room + other.no_room, self.split_character + other.split_character


class WindowFim:
    """Fast-LLM's FIM, as it trained StarCoder2-3B: applied to each training window, so that every FIM example
    lies whole in the window it is trained in (`fim_level: window`; data/windows/packing.py calls it).

    The file-level transform above cuts whole files before packing; a file longer than the window (the Stack's
    median Python file is ~2,300 tokens of a 4k BPE) then puts its middle windows away from the prefix end it
    continues. Here, as in Fast-LLM's GPTFimDataset, the window's tokens are split on `<|endoftext|>` into
    examples (each a FIM candidate with probability `fim_rate`) and on `<file_sep>` into file fragments (each
    transformed with probability `fim_fragment_rate`); a fragment is decoded, cut at two uniform character
    positions, its three parts tokenized apart (special-token parsing off) and written in PSM or SPM order
    (`fim_spm_rate`). `<repo_name>name` is never transformed, and in an example with metadata the path line
    that opens a file (when the file opens in the window) stays at the start of the prefix.

    Unlike Fast-LLM, nothing is truncated: the window reads `reserve(seq_length)` fewer stream tokens than it
    holds, and a fragment whose sentinels do not fit that room is left plain (counted as `no_room`), as is one
    cut by the window's edge inside a multi-byte character (`split_character`); the room left over is padding,
    never a target. Every draw comes from (seed, epoch, window index), so a resumed run sees the same windows.

    Cost per rank: the tokenizer and a table of each token's bytes (~50 bytes per vocabulary entry, 2.5 MB for
    StarCoder2's 49,152); per window, decoding and re-tokenizing its transformed fragments (a fraction of a
    millisecond per thousand tokens on one core, in the data-loader workers); the reserve is padding, 0.8% of a
    4k window.
    """

    def __init__(self, tokenizer, rates: FimRates, seed: int, epoch: int):
        self.pieces = tokenizer if isinstance(tokenizer, PieceTokenizer) else PieceTokenizer(tokenizer)
        self.rates, self.seed, self.epoch = rates, seed, epoch
        special = self.pieces.special
        self.special = special
        self.structure = np.array(sorted(special.as_set()), dtype=np.int64)
        self._bytes = None

    @staticmethod
    def reserve(seq_length: int) -> int:
        """Tokens of each window kept for sentinels: 16, or 1/128 of a long window (32 of 4k, 128 of 16k)."""
        return min(seq_length // 2, max(16, seq_length // 128))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bytes": None}  # rebuilt where it is used

    def _token_bytes(self) -> list[bytes]:
        if self._bytes is None:
            alphabet, backend = byte_level_alphabet(), self.pieces.backend
            table = []
            for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
                token = backend.id_to_token(token_id) or ""
                try:
                    table.append(bytes(alphabet[char] for char in token))
                except KeyError:  # an added (structure) token: fragments never decode one
                    table.append(b"")
            self._bytes = table
        return self._bytes

    def __call__(self, index: int, tokens: np.ndarray, starts: np.ndarray, continues_with_metadata: bool, room: int):
        """(tokens, starts, WindowFimCounts) of window `index`: its stream `tokens` (int64), `starts` (True at each
        example start), whether the example it opens with (begun in an earlier window) carries metadata, and the
        window's size `room`. The result is at most `room` tokens; example starts are kept in place."""
        rng = example_rng(self.seed, self.epoch, f"window {index}", "fim")
        special, rates = self.special, self.rates
        boundaries = np.flatnonzero((tokens == special.eos) | (tokens == special.file_sep)).tolist()
        # Fragments are the runs between separators; an example starts after each <|endoftext|>.
        metadata, candidate = continues_with_metadata, rng.random() < rates.fim_rate
        chosen, begin = [], 0
        for end in [*boundaries, len(tokens)]:
            if begin > 0 and tokens[begin - 1] == special.eos:
                metadata = bool(end > begin and tokens[begin] == special.repo_name)
                candidate = rng.random() < rates.fim_rate
            if candidate and end > begin and tokens[begin] != special.repo_name:
                if rng.random() < rates.fim_fragment_rate:
                    has_header = metadata and begin > 0 and tokens[begin - 1] == special.file_sep
                    chosen.append((begin, end, has_header, rng.random(), rng.random(), rng.random()))
            begin = end + 1
        return self._transform(tokens, starts, chosen, WindowFimCounts(), room)

    def _transform(self, tokens, starts, chosen, counts, room):
        table, special = self._token_bytes(), self.special
        texts, plans = [], []
        for begin, end, has_header, draw_a, draw_b, draw_order in chosen:
            fragment = tokens[begin:end]
            if np.isin(fragment, self.structure).any():  # FIM'd already, or a stray structure token: left as is
                continue
            try:
                text = b"".join(table[token] for token in fragment.tolist()).decode("utf-8")
            except UnicodeDecodeError:
                counts.split_character += 1
                continue
            header = text[: text.index("\n") + 1] if has_header and "\n" in text else ""
            body = text[len(header) :]
            cut_a, cut_b = sorted((int(draw_a * (len(body) + 1)), int(draw_b * (len(body) + 1))))
            texts += [header + body[:cut_a], body[cut_a:cut_b], body[cut_b:]]
            plans.append((begin, end, draw_order < self.rates.fim_spm_rate))
        encoded = self.pieces.encode_texts(texts) if texts else []
        done, position = [], 0
        for number, (begin, end, spm) in enumerate(plans):
            prefix, middle, suffix = encoded[3 * number : 3 * number + 3]
            if spm:
                new = [special.fim_prefix, special.fim_suffix, *suffix, special.fim_middle, *prefix, *middle]
            else:
                new = [special.fim_prefix, *prefix, special.fim_suffix, *suffix, special.fim_middle, *middle]
            done.append((begin, end, np.array(new, dtype=np.int64), spm))
        # Fit the window: leave the last transformed fragments plain until the sentinels fit.
        total = len(tokens) + sum(len(new) - (end - begin) for begin, end, new, _ in done)
        while done and total > room:
            begin, end, new, _ = done.pop()
            total -= len(new) - (end - begin)
            counts.no_room += 1
        out_tokens, out_starts = [], []
        for begin, end, new, spm in done:
            out_tokens += [tokens[position:begin], new]
            out_starts += [starts[position:begin], np.zeros(len(new), dtype=bool)]
            position = end
            counts.spm += spm
            counts.psm += not spm
        out_tokens.append(tokens[position:])
        out_starts.append(starts[position:])
        return np.concatenate(out_tokens), np.concatenate(out_starts), counts

"""The settings of bigcode-evaluation-harness's HumanEval task, each with the harness source it was read from.

evaluation/humaneval.py generates and scores by them; docs/humaneval.md has the same settings as a table. The
harness sources were read at HEAD 8fc5bae (github.com/bigcode-project/bigcode-evaluation-harness).
"""

import dataclasses
from dataclasses import dataclass, field

# bigcode_eval/tasks/humaneval.py, GeneralHumanEval.__init__: the task's stop_words, in the harness's order.
# ("<file_sep>" is in the current version; the version of early 2023 lacked it.)
HUMANEVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
# The eos token of the StarCoder2 tokenizer; the harness appends the tokenizer's own eos token to the stop
# words (bigcode_eval/generation.py, parallel_generations), and "<|endoftext|>" is also EvalArguments.eos.
STARCODER2_EOS_TOKEN = "<|endoftext|>"


def _setting(default, source: str):
    return field(default=default, metadata={"source": source})


@dataclass(frozen=True)
class HumanEvalSettings:
    """How the harness generates and scores HumanEval; the defaults are the harness's own defaults.

    Sources (bigcode-project/bigcode-evaluation-harness unless named otherwise), one line per field:
    """

    strip_prompt: bool = _setting(
        True,
        "bigcode_eval/tasks/humaneval.py: task `humaneval` is create_task(True), whose get_prompt returns "
        "doc['prompt'].strip(); task `humaneval-unstripped` is create_task(False) (prompt unchanged)",
    )
    prefix: str = _setting(
        "",
        "bigcode_eval/arguments.py: EvalArguments.prefix defaults to ''; bigcode_eval/utils.py TokenizedDataset "
        "puts it before the prompt and update_code_gens cuts len(prefix) characters off the output",
    )
    stop_sequences: tuple[str, ...] = _setting(
        HUMANEVAL_STOP_SEQUENCES, "bigcode_eval/tasks/humaneval.py: GeneralHumanEval.__init__ stop_words"
    )
    stop_at_eos: bool = _setting(
        True,
        "bigcode_eval/generation.py: parallel_generations appends tokenizer.eos_token to task.stop_words when "
        "the task has stop words and the tokenizer an eos token",
    )
    do_sample: bool = _setting(True, "bigcode_eval/arguments.py: EvalArguments.do_sample defaults to True")
    temperature: float = _setting(0.2, "bigcode_eval/arguments.py: EvalArguments.temperature defaults to 0.2")
    top_p: float = _setting(0.95, "bigcode_eval/arguments.py: EvalArguments.top_p defaults to 0.95")
    top_k: int = _setting(
        0, "bigcode_eval/arguments.py: EvalArguments.top_k defaults to 0 (transformers: no top-k filtering)"
    )
    n_samples: int = _setting(
        1,
        "bigcode_eval/arguments.py: EvalArguments.n_samples defaults to 1 (docs/README.md's HumanEval command "
        "uses 200; the BigCode leaderboard and issue #82 use 50)",
    )
    batch_size: int = _setting(
        1,
        "main.py: --batch_size defaults to 1 (docs/README.md: 'by default it is 1'); it is generate's "
        "num_return_sequences for one prompt",
    )
    max_length_generation: int = _setting(
        512,
        "main.py: --max_length_generation defaults to 512, 'prompt+generation'; bigcode_eval/generation.py "
        "passes it to generate as max_length (README.md: 'including the input token length')",
    )
    seed: int = _setting(
        0, "bigcode_eval/arguments.py: EvalArguments.seed defaults to 0; generation.py calls set_seed(args.seed)"
    )
    precision: str = _setting(
        "fp32", "main.py: --precision defaults to fp32 (the dtype the model is loaded in; the caller's here)"
    )
    k: tuple[int, ...] = _setting(
        (1, 10, 100),
        "bigcode_eval/tasks/humaneval.py: GeneralHumanEval k=[1, 10, 100]; compute_code_eval reports pass@k "
        "only when every problem has at least k samples",
    )
    timeout: float = _setting(3.0, "bigcode_eval/tasks/humaneval.py: GeneralHumanEval timeout=3.0 (seconds)")
    num_workers: int = _setting(
        16, "bigcode_eval/tasks/humaneval.py: GeneralHumanEval num_workers=16 (programs run in parallel)"
    )

    def evaluate_kwargs(self) -> dict:
        """These settings as keyword arguments of evaluate_humaneval (k is the caller's: at most n_samples)."""
        return dict(
            num_samples=self.n_samples,
            temperature=self.temperature if self.do_sample else 0.0,
            top_p=self.top_p,
            batch_size=self.batch_size,
            max_length_generation=self.max_length_generation,
            strip_prompt=self.strip_prompt,
            prefix=self.prefix,
            seed=self.seed,
            timeout=self.timeout,
            num_workers=self.num_workers,
        )


HumanEvalSettings.__doc__ += "".join(
    f"    - {setting.name}: {setting.metadata['source']}.\n" for setting in dataclasses.fields(HumanEvalSettings)
)

HARNESS_DEFAULTS = HumanEvalSettings()
# huggingface.co/spaces/bigcode/bigcode-models-leaderboard, src/text_content.py: "top-p=0.95, temperature=0.2,
# max_length_generation 512, and n_samples=50"; bigcode-evaluation-harness issue #82: the same with
# --batch_size 50 (and --precision bf16) reproduces StarCoder's HumanEval pass@1.
STARCODER2_PASS_AT_1 = dataclasses.replace(HARNESS_DEFAULTS, n_samples=50, batch_size=50, k=(1,))
# Greedy decoding in the harness: --do_sample False with one sample per problem.
GREEDY = dataclasses.replace(HARNESS_DEFAULTS, do_sample=False, n_samples=1, k=(1,))


def settings_for(
    *,
    num_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    max_length_generation: int = 512,
    strip_prompt: bool = True,
    prefix: str = "",
) -> HumanEvalSettings:
    """The settings the keyword arguments of generate_completions and evaluate_humaneval stand for
    (temperature 0: greedy)."""
    return dataclasses.replace(
        HARNESS_DEFAULTS,
        n_samples=num_samples,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        max_length_generation=max_length_generation,
        strip_prompt=strip_prompt,
        prefix=prefix,
    )

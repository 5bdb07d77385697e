"""pass@k of generated programs, as an `evaluate` metric that works offline.

Load it by path (`evaluate.load("code_eval")` would fetch a script from the Hub):

    metric = evaluate.load(starcoder2_train.evaluation.humaneval.CODE_EVAL_METRIC_PATH)
    pass_at_k, results = metric.compute(predictions=[["def f(): return 1"]],
                                        references=["assert f() == 1"], k=[1])

The interface is that of the Hub's code_eval: `predictions` holds the candidate programs of each problem,
`references` the test program of each problem; every candidate + "\n" + test runs in its own sandboxed
process (starcoder2_train.evaluation.execution; needs HF_ALLOW_CODE_EVAL=1).
"""

import logging

import datasets
import evaluate
import numpy as np

from starcoder2_train.evaluation.execution import ExecutionLimits, require_code_execution_allowed, run_programs

logger = logging.getLogger(__name__)

_DESCRIPTION = """pass@k with the unbiased estimator of Chen et al. (2021): for a problem with n samples of which
c pass, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems. Candidates run sandboxed; see
starcoder2_train/evaluation/execution.py."""

_CITATION = """@article{chen2021codex, title={Evaluating Large Language Models Trained on Code},
author={Mark Chen and others}, year={2021}, eprint={2107.03374}, archivePrefix={arXiv}}"""

_INPUTS = """
Args:
    predictions: list of lists of candidate programs, one list per problem.
    references: list of test programs (asserts), one per problem.
    k: the k of pass@k to report (each must be at most the number of candidates per problem).
    num_workers: programs run at the same time.
    timeout: wall-clock seconds per program.
    memory_bytes: address-space limit per program.
Returns:
    (pass_at_k, results): {"pass@1": ...}, and for each problem index a list of
    (completion_id, {"task_id", "completion_id", "passed", "result"}).
"""


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n-c, k)/C(n, k), computed as a stable product."""
    num_samples, num_correct = np.atleast_1d(num_samples), np.atleast_1d(num_correct)

    def one(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([one(int(n), int(c)) for n, c in zip(num_samples, num_correct)])


class CodeEval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
            homepage="https://github.com/openai/human-eval",
            codebase_urls=["https://github.com/openai/human-eval"],
            reference_urls=["https://arxiv.org/abs/2107.03374"],
            license="MIT",
        )

    def _compute(self, predictions, references, k=(1, 10, 100), num_workers=4, timeout=3.0, memory_bytes=1 << 30):
        require_code_execution_allowed()
        if len(predictions) != len(references):
            raise ValueError(
                f"code_eval: {len(predictions)} problems in predictions but {len(references)} "
                "references; give one list of candidates and one test per problem."
            )
        jobs = [
            (task_id, completion_id, candidate + "\n" + test)
            for task_id, (candidates, test) in enumerate(zip(predictions, references))
            for completion_id, candidate in enumerate(candidates)
        ]
        limits = ExecutionLimits(timeout_s=timeout, memory_bytes=memory_bytes)
        outcomes = run_programs([program for _, _, program in jobs], limits, num_workers=num_workers)
        results = {task_id: [] for task_id in range(len(predictions))}
        for (task_id, completion_id, _), outcome in zip(jobs, outcomes):
            results[task_id].append(
                (
                    completion_id,
                    {
                        "task_id": task_id,
                        "completion_id": completion_id,
                        "passed": outcome.passed,
                        "result": outcome.result,
                    },
                )
            )
        total = np.array([len(candidates) for candidates in predictions])
        correct = np.array([sum(r["passed"] for _, r in results[task_id]) for task_id in results])
        pass_at_k = {}
        for value in [k] if isinstance(k, int) else k:
            if (total >= value).all():
                pass_at_k[f"pass@{value}"] = float(estimate_pass_at_k(total, correct, value).mean())
            else:
                logger.warning(f"code_eval: pass@{value} left out: some problems have fewer than {value} candidates.")
        return pass_at_k, results

"""starcoder2_train: StarCoder2-style code models trained with transformers, datasets, accelerate and DeepSpeed.

The subpackages follow a run, and each may import only those before it in this list:
- `configs/`: what a recipe may say, one module per kind of key (`model_arguments`, `data_arguments`,
  `training_arguments`), and `shared`, the facts every stage shares;
  `recipe`: reading a recipe YAML and command-line overrides into them; `cli` (standard library only, imported
  by recipe and the scripts): the scripts' one command-line convention;
- `data/`: Stack v2 shards → repository examples → FIM → tokens → packed windows → batches;
- `model/`: the StarCoder2 model, its attention kernels, LoRA/QLoRA adapters, its FLOPs and memory;
- `training/`: the Trainer, its loss, checkpoints, preemption, the dry run, throughput and process groups;
- `evaluation/`: held-out loss, FIM exact match, HumanEval, and the sandbox that runs model code;
- `hub/`: the model card and the upload;
- `run`: one training run from parsed recipe arguments (what scripts/run_pretrain.py runs); `sft`: instruction
  tuning through TRL's SFTTrainer on the same model building, checkpoints and preemption;
- `api`: the Python API a notebook uses (`Recipe`, `ingest_code`, `infill`), over `run` and the rest;
- `benchmarking/`: speed measurements against the plain transformers path (scripts only).
docs/architecture.md follows one sample through them, file by file.
"""

__all__ = ["Recipe", "infill", "ingest_code", "load_model"]


def __getattr__(name: str):
    """`from starcoder2_train import Recipe`: the API is imported when first asked for, so that importing one
    subpackage (a benchmark's light parent process, say) does not import transformers through it."""
    if name in __all__:
        from starcoder2_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'starcoder2_train' has no attribute {name!r}")

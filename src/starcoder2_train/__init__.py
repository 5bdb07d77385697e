"""starcoder2_train: StarCoder2-style code models trained with transformers, datasets, accelerate and DeepSpeed.

The subpackages follow a run, and each may import only those before it in this list:
- `configs`: what a recipe may say (model, data and training arguments) and the facts every stage shares;
  `recipe`: reading a recipe YAML and command-line overrides into them;
- `data/`: Stack v2 shards → repository examples → FIM → tokens → packed windows → batches;
- `model/`: the StarCoder2 model, its attention kernels, its FLOPs and memory, the dry run;
- `training/`: the Trainer, its loss, throughput figures and process-group helpers;
- `evaluation/`: held-out loss, FIM exact match, HumanEval, and the sandbox that runs model code;
- `hub/`: the model card and the upload;
- `benchmarking/`: speed measurements against the plain transformers path (scripts only).
docs/architecture.md follows one sample through them, file by file.
"""

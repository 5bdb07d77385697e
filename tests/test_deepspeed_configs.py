"""accelerate_configs/deepspeed/*.json as DeepSpeed itself reads them (its own config classes)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JSONS = sorted((ROOT / "accelerate_configs/deepspeed").glob("*.json"))
# What the Trainer fills in for the "auto" values (transformers' HfTrainerDeepSpeedConfig), for a run with
# micro batches of 2, 2 of them per optimizer step, one process and max_grad_norm 1.0.
AUTO_VALUES = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "train_batch_size": 4,
    "gradient_clipping": 1.0,
    "reduce_bucket_size": 10_000,
    "stage3_prefetch_bucket_size": 10_000,
    "stage3_param_persistence_threshold": 1_000,
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.1,
}


def _resolved(value, autos):
    if isinstance(value, dict):
        return {
            key: autos[key] if item == "auto" and key in autos else _resolved(item, autos)
            for key, item in value.items()
        }
    return value


def resolved_config(path, bf16: bool = True, **overrides) -> dict:
    """The JSON at `path` with every "auto" replaced as the Trainer would (AUTO_VALUES, `overrides` win)."""
    config = _resolved(json.loads(Path(path).read_text()), {**AUTO_VALUES, **overrides})
    config["bf16"]["enabled"], config["fp16"]["enabled"] = bf16, False
    return config


@pytest.mark.parametrize("path", JSONS, ids=[path.stem for path in JSONS])
def test_every_deepspeed_json_keeps_the_bf16_overflow_check_on_explicitly(path):
    """DeepSpeed 0.19.8 defaults bf16.check_grad_overflow to true; the JSONs say so explicitly (a later DeepSpeed may
    change the default). Off, ZeRO-2 would save two host reads per optimizer step but still wait for the GPU once
    (the norm test in `unscale_and_clip_grads`), and it would write a NaN gradient into the weights instead of
    skipping the step (README.md beside the JSONs; tests/test_callbacks.py counts both). Read back through
    DeepSpeed's own parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    assert json.loads(path.read_text())["bf16"].get("check_grad_overflow") is True, f"{path.name}: say it explicitly"
    config = DeepSpeedConfig(resolved_config(path))
    assert config.bfloat16_config.enabled and config.zero_enabled
    assert config.bfloat16_config.check_grad_overflow is True


def test_the_readme_names_every_json():
    readme = (ROOT / "accelerate_configs/deepspeed/README.md").read_text()
    assert all(path.name in readme for path in JSONS)

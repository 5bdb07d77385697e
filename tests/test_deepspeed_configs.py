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
def test_every_deepspeed_json_turns_the_bf16_overflow_check_off(path):
    """DeepSpeed 0.19.8 defaults bf16.check_grad_overflow to true: ZeRO-2's step then reads `has_overflow` (an
    `.item()`) and whether the norm is finite (a `bool()`) on the host. The JSONs turn it off (README.md beside them
    says what that costs a step with a non-finite gradient); this reads it back through DeepSpeed's own parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig(resolved_config(path))
    assert config.bfloat16_config.enabled and config.zero_enabled
    assert config.bfloat16_config.check_grad_overflow is False, f"{path.name}: set bf16.check_grad_overflow: false"


def test_the_readme_names_every_json():
    readme = (ROOT / "accelerate_configs/deepspeed/README.md").read_text()
    assert all(path.name in readme for path in JSONS)

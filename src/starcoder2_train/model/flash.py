"""Which FlashAttention PyTorch's flash kernel runs: fa2 (its own), fa3 or fa4 (`flash_attention_impl`).

`torch.nn.attention.activate_flash_attention_impl("FA3" | "FA4")` re-registers aten's flash kernels
(`_flash_attention_forward`/`_backward` and sdpa's flash backend) for CUDA with FlashAttention-3 (the
`flash_attn_interface` package, Hopper: compute capability 9.x) or FlashAttention-4 (`flash_attn.cute`, compute
capability 9.x or 10.x, the ones torch's FA4 glue accepts), so `sdpa_varlen` and sdpa follow without a change.
Neither has dropout. `choose_flash_impl` is the decision, a pure function of the request, the dropout, the GPU's
compute capability and the installed packages; `activate_flash_impl` applies it on this machine.
"""

import importlib.util
import logging

import torch
from torch.nn.attention import (
    activate_flash_attention_impl,
    current_flash_attention_impl,
    restore_flash_attention_impl,
)

from starcoder2_train.configs import RecipeError

logger = logging.getLogger(__name__)

# The package each implementation needs, and the compute-capability majors torch's glue for it accepts.
FLASH_PACKAGES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}
FLASH_ARCHITECTURES = {"fa3": (9,), "fa4": (9, 10)}


def _unmet(impl: str, capability: tuple[int, int], packages) -> str | None:
    """Why `impl` cannot run on a GPU of `capability` with `packages` installed, or None if it can."""
    if capability[0] not in FLASH_ARCHITECTURES[impl]:
        majors = " or ".join(f"{major}.x" for major in FLASH_ARCHITECTURES[impl])
        return f"{impl} needs compute capability {majors}, this GPU has {capability[0]}.{capability[1]}"
    if FLASH_PACKAGES[impl] not in packages:
        return f"{impl} needs the {FLASH_PACKAGES[impl]} package, which is not installed"
    return None


def choose_flash_impl(requested: str, dropout: float, capability: tuple[int, int] | None, packages) -> tuple[str, str]:
    """The FlashAttention to activate, and why: ("fa2" | "fa3" | "fa4", reason). No side effects, no cost.

    `capability` is the CUDA GPU's (major, minor), None without one; `packages` the importable ones of
    FLASH_PACKAGES. fa3/fa4 asked for with `dropout` > 0, or on a GPU or installation that lacks them, is a
    RecipeError; without a GPU nothing is routed (fa2). auto: fa4, else fa3, where the GPU and packages allow
    and dropout is 0; else fa2.
    """
    if requested in FLASH_PACKAGES and dropout > 0:
        raise RecipeError(
            f"flash_attention_impl: {requested} has no dropout, and the model's attention_dropout is {dropout}. "
            "Use flash_attention_impl: fa2 (or auto, which then picks fa2), or a model_config with "
            "attention_dropout 0."
        )
    if requested == "fa2":
        return "fa2", "requested"
    if capability is None:
        return "fa2", "no CUDA GPU: no flash kernel to route"
    if requested in FLASH_PACKAGES:
        unmet = _unmet(requested, capability, packages)
        if unmet is not None:
            raise RecipeError(f"flash_attention_impl: {unmet}. Install it, or use fa2 or auto.")
        return requested, "requested"
    if dropout > 0:
        return "fa2", f"attention_dropout is {dropout}, and FA3 and FA4 have no dropout"
    reasons = []
    for impl in ("fa4", "fa3"):
        unmet = _unmet(impl, capability, packages)
        if unmet is None:
            return impl, f"auto: GPU {capability[0]}.{capability[1]} with {FLASH_PACKAGES[impl]}"
        reasons.append(unmet)
    return "fa2", "; ".join(reasons)


def installed_flash_packages() -> set[str]:
    """The FLASH_PACKAGES that can be imported here (finding one imports its parent package, nothing more)."""
    found = set()
    for name in FLASH_PACKAGES.values():
        try:
            if importlib.util.find_spec(name) is not None:
                found.add(name)
        except ImportError:  # a parent package that is missing or fails to import
            pass
    return found


def activate_flash_impl(requested: str, attention_dropout: float, *, device=None) -> str:
    """Route PyTorch's flash kernel as `flash_attention_impl` asks on this machine; return what is active.

    `device`: the CUDA device whose compute capability decides (default the current one). Logs the choice and
    its reason. Activating fa3/fa4 imports its package once; fa2 restores PyTorch's own kernel if another was
    active. Errors (RecipeError) name flash_attention_impl.
    """
    capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    impl, reason = choose_flash_impl(requested, attention_dropout, capability, installed_flash_packages())
    logger.info("flash_attention_impl %s: %s (%s)", requested, impl, reason)
    active = current_flash_attention_impl()
    if impl == "fa2":
        if active is not None:
            restore_flash_attention_impl()
    elif active != impl.upper():
        try:
            activate_flash_attention_impl(impl.upper())
        except (ImportError, RuntimeError) as error:
            raise RecipeError(
                f"flash_attention_impl: {impl} could not be activated ({error}); reinstall "
                f"{FLASH_PACKAGES[impl]}, or use fa2."
            ) from error
    return impl

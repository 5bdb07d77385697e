"""Which FlashAttention runs: transformers' flash_attention_2, and PyTorch's flash kernel (`flash_attention_impl`).

`flash_attention_2_available` says whether transformers accepts `attn_implementation: flash_attention_2` here
(the flash-attn distribution, FlashAttention-2; a flash-attn-4 install alone is not it). Everything that picks an
attention implementation asks it (model/factory.py `choose_attention`, benchmarking/paths.py).

`torch.nn.attention.activate_flash_attention_impl("FA3" | "FA4")` re-registers aten's flash kernels
(`_flash_attention_forward`/`_backward` and sdpa's flash backend) for CUDA with FlashAttention-3 (it imports
`flash_attn_interface`; Hopper: compute capability 9.x) or FlashAttention-4 (it imports
`flash_attn.cute.interface`, from the flash-attn-4 wheel; compute capability 9.x or 10.x, the ones torch's FA4
glue accepts), so `sdpa_varlen` and sdpa follow without a change (torch 2.13, torch/nn/attention/_fa3.py,
_fa4.py). Neither has dropout. `choose_flash_impl` is the decision, a pure function of the request, the dropout,
the GPU's compute capability and the installed packages; `apply_flash_impl` carries it out (for auto, an
activation that fails falls back to fa2 with a warning), and `activate_flash_impl` does both on this machine.
"""

import importlib.machinery
import importlib.metadata
import importlib.util
import logging

import torch
from packaging.version import InvalidVersion, Version
from torch.nn.attention import (
    activate_flash_attention_impl,
    current_flash_attention_impl,
    restore_flash_attention_impl,
)

from starcoder2_train.configs import RecipeError

logger = logging.getLogger(__name__)

# The module torch imports to activate each implementation (torch 2.13's register_flash_attention_fa3/fa4
# defaults), and the compute-capability majors torch's glue for it accepts.
FLASH_PACKAGES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute.interface"}
FLASH_ARCHITECTURES = {"fa3": (9,), "fa4": (9, 10)}
# The oldest flash-attn transformers 5.25 accepts for flash_attention_2.
FLASH_ATTN_2_MIN_VERSION = Version("2.3.3")


def module_findable(name: str) -> bool:
    """Whether the dotted module `name` can be found, importing nothing: not even its parent packages.

    The top-level package is found by `importlib.util.find_spec`, each submodule by `PathFinder` in its
    parent's search locations. (`find_spec("a.b.c")` would import `a.b`, and flash-attn-4's
    `flash_attn/cute/__init__.py` imports its whole interface and the CuTe DSL.)
    """
    top, *submodules = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return False
    for depth in range(1, len(submodules) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return False
        qualified = ".".join([top, *submodules[:depth]])
        spec = importlib.machinery.PathFinder.find_spec(qualified, spec.submodule_search_locations)
    return spec is not None


def flash_attention_2_available(cuda: bool) -> bool:
    """Whether transformers accepts `attn_implementation: flash_attention_2` here; `cuda`: a CUDA GPU is used.

    The check of transformers 5.25's `is_flash_attn_2_available` (utils/import_utils.py), without its
    kernels-hub fallback and counting CUDA only (not MLU/MUSA): `flash_attn` is findable, the distributions
    that provide the `flash_attn` import name include `flash-attn` (`importlib.metadata.packages_distributions`,
    underscores read as hyphens), and its version is at least 2.3.3. The flash-attn-4 wheel ships
    `flash_attn/cute/` without `flash_attn/__init__.py` under the distribution `flash-attn-4`: a namespace
    package that `find_spec("flash_attn")` finds, but not FlashAttention-2.
    """
    if not cuda or not module_findable("flash_attn"):
        return False
    providers = importlib.metadata.packages_distributions().get("flash_attn", [])
    if "flash-attn" not in [name.replace("_", "-") for name in providers]:
        return False
    try:
        return Version(importlib.metadata.version("flash_attn")) >= FLASH_ATTN_2_MIN_VERSION
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return False


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

    `capability` is the CUDA GPU's (major, minor), None without one; `packages` the findable ones of
    FLASH_PACKAGES (`installed_flash_packages`). fa3/fa4 asked for with `dropout` > 0, or on a GPU or
    installation that lacks them, is a RecipeError; without a GPU nothing is routed (fa2). auto: fa4, else fa3,
    where the GPU and packages allow and dropout is 0; else fa2.
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
    """The FLASH_PACKAGES that can be found here (`module_findable`: nothing is imported, so a broken one counts)."""
    return {name for name in FLASH_PACKAGES.values() if module_findable(name)}


def apply_flash_impl(
    requested: str, attention_dropout: float, capability, packages, *, activate=activate_flash_attention_impl
) -> str:
    """Route PyTorch's flash kernel as `choose_flash_impl` decides; return what is active ("fa2" | "fa3" | "fa4").

    Logs the choice and its reason. fa3/fa4 is activated, unless already active, by `activate` (torch's
    `activate_flash_attention_impl`, which imports the package; a parameter for tests). An activation that fails
    (the package is found but does not import, or lacks the kernels) is, for `requested` auto, a warning with
    the reason and fa2; for an explicit fa3/fa4, a RecipeError naming flash_attention_impl. fa2 restores
    PyTorch's own kernel if another was active.
    """
    impl, reason = choose_flash_impl(requested, attention_dropout, capability, packages)
    logger.info("flash_attention_impl %s: %s (%s)", requested, impl, reason)
    if impl != "fa2" and current_flash_attention_impl() != impl.upper():
        try:
            activate(impl.upper())
        except Exception as error:  # a broken install fails in its own way: import, missing kernels, CUDA
            cause = f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
            if requested != "auto":
                raise RecipeError(
                    f"flash_attention_impl: {impl} could not be activated ({cause}); reinstall the package that "
                    f"provides {FLASH_PACKAGES[impl]}, or use fa2 or auto."
                ) from error
            logger.warning("flash_attention_impl auto: %s could not be activated (%s); using fa2", impl, cause)
            impl = "fa2"
    if impl == "fa2" and current_flash_attention_impl() is not None:
        restore_flash_attention_impl()
    return impl


def activate_flash_impl(requested: str, attention_dropout: float, *, device=None) -> str:
    """`apply_flash_impl` on this machine: the compute capability of the CUDA `device` (default the current one;
    None without CUDA) and `installed_flash_packages()`. Returns what is active."""
    capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    return apply_flash_impl(requested, attention_dropout, capability, installed_flash_packages())

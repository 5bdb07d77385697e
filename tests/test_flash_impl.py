"""FlashAttention package detection on real package layouts, and the fallback of `flash_attention_impl: auto`.

Each test writes the packages it needs into a temporary folder put first on sys.path: a flash-attn-4 wheel's
layout (`flash_attn/cute/`, no `flash_attn/__init__.py`), a flash-attn (FlashAttention-2) install with its
dist-info, or a `flash_attn_interface` that fails on import. CUDA and the GPU's compute capability are
parameters of the functions under test; nothing of torch is mocked.
"""

import importlib.util
import inspect
import logging
import sys

import pytest
from torch.nn.attention import _fa3, _fa4, current_flash_attention_impl
from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
from transformers.utils import import_utils

from starcoder2_train.benchmarking.paths import flattening_attention
from starcoder2_train.configs import RecipeError
from starcoder2_train.model.factory import choose_attention
from starcoder2_train.model.flash import (
    FLASH_PACKAGES,
    apply_flash_impl,
    flash_attention_2_available,
    installed_flash_packages,
)

H100, B200 = (9, 0), (10, 0)
FLASH_ROOTS = ("flash_attn", "flash_attn_interface")


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def dist_info(site, name: str, version: str, top_level: str):
    """A distribution's metadata as pip leaves it: METADATA and top_level.txt (read by packages_distributions)."""
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    write(folder / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    write(folder / "top_level.txt", f"{top_level}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty folder first on sys.path; no flash package imported before the test is left in sys.modules."""
    if any(importlib.util.find_spec(root) is not None for root in FLASH_ROOTS):
        pytest.skip("a flash package is installed here and would shadow the test's layouts")
    for name in [name for name in sys.modules if name.split(".")[0] in FLASH_ROOTS]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [name for name in sys.modules if name.split(".")[0] in FLASH_ROOTS]:
        del sys.modules[name]  # what the test's imports left (a namespace flash_attn)
    import_utils._package_distribution_mapping.cache_clear()  # may hold the test's layout


def fa4_wheel(site, *, metadata: bool):
    """flash-attn-4 4.0.0b36's layout; its `flash_attn/cute/__init__.py` imports cutlass, missing here."""
    write(site / "flash_attn" / "cute" / "__init__.py", "import cutlass  # noqa\n")
    write(site / "flash_attn" / "cute" / "interface.py", "def _flash_attn_fwd(): ...\ndef _flash_attn_bwd(): ...\n")
    if metadata:
        dist_info(site, "flash-attn-4", "4.0.0b36", "flash_attn")


def fa2_install(site, version: str):
    """flash-attn's layout: a regular `flash_attn` package and a dist-info named flash_attn."""
    write(site / "flash_attn" / "__init__.py", f"__version__ = '{version}'\n")
    dist_info(site, "flash_attn", version, "flash_attn")


def transformers_finds_flash_attn_2() -> bool:
    """transformers' own package check for FlashAttention-2 (the part of is_flash_attn_2_available without CUDA).

    transformers 5.25 caches the import-name-to-distribution map once per process; the test's layouts are new.
    """
    import_utils._package_distribution_mapping.cache_clear()
    return FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["pkg_availability_check"]()


@pytest.mark.parametrize("metadata", [True, False], ids=["wheel", "bare folder"])
def test_flash_attn_4_alone_is_not_flash_attention_2(site, metadata):
    fa4_wheel(site, metadata=metadata)
    assert importlib.util.find_spec("flash_attn") is not None  # a namespace package: what misled the old check
    assert not flash_attention_2_available(cuda=True) and not transformers_finds_flash_attn_2()
    assert choose_attention("auto", cuda=True) == "sdpa_varlen"
    assert flattening_attention(cuda=True) == "sdpa"
    with pytest.raises(RecipeError, match="attn_implementation: flash_attention_2 needs the flash-attn package"):
        choose_attention("flash_attention_2", cuda=True)


def test_flash_attn_2_is_chosen_where_transformers_accepts_it(site):
    fa2_install(site, "2.8.3")
    assert flash_attention_2_available(cuda=True) and transformers_finds_flash_attn_2()
    assert choose_attention("auto", cuda=True) == "flash_attention_2"
    assert choose_attention("flash_attention_2", cuda=True) == "flash_attention_2"
    assert flattening_attention(cuda=True) == "flash_attention_2"
    assert not flash_attention_2_available(cuda=False) and choose_attention("auto", cuda=False) == "sdpa_blocked"


def test_flash_attn_2_older_than_transformers_accepts(site):
    fa2_install(site, "2.3.2")  # transformers 5.25 wants >= 2.3.3
    assert not flash_attention_2_available(cuda=True)
    assert choose_attention("auto", cuda=True) == "sdpa_varlen"


def test_flash_packages_are_the_modules_torch_imports():
    for impl, register in (("fa3", _fa3.register_flash_attention_fa3), ("fa4", _fa4.register_flash_attention_fa4)):
        assert FLASH_PACKAGES[impl] == inspect.signature(register).parameters["module_path"].default


def test_fa4_is_found_in_the_wheel_layout_without_importing_it(site):
    fa4_wheel(site, metadata=True)
    assert installed_flash_packages() == {FLASH_PACKAGES["fa4"]}
    assert not [name for name in sys.modules if name.startswith("flash_attn")]  # cute/__init__ would fail


def broken_flash_attn_interface(site):
    write(site / "flash_attn_interface.py", "raise ImportError('libcudart.so.12: cannot open shared object file')\n")


def test_auto_falls_back_to_fa2_when_activation_fails(site, caplog):
    broken_flash_attn_interface(site)
    packages = installed_flash_packages()
    assert packages == {"flash_attn_interface"}
    with caplog.at_level(logging.WARNING, logger="starcoder2_train.model.flash"):
        assert apply_flash_impl("auto", 0.0, H100, packages) == "fa2"
    assert current_flash_attention_impl() is None
    warning = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "fa3 could not be activated" in warning and "libcudart.so.12" in warning and "fa2" in warning


def test_auto_falls_back_when_fa4_fails_to_import(site, caplog):
    fa4_wheel(site, metadata=True)  # found, but importing flash_attn.cute.interface needs cutlass
    with caplog.at_level(logging.WARNING, logger="starcoder2_train.model.flash"):
        assert apply_flash_impl("auto", 0.0, B200, installed_flash_packages()) == "fa2"
    assert "cutlass" in caplog.text and current_flash_attention_impl() is None


def test_explicit_flash_impl_that_fails_to_activate_is_a_recipe_error(site):
    broken_flash_attn_interface(site)
    with pytest.raises(
        RecipeError, match=r"flash_attention_impl: fa3 could not be activated \(ImportError: libcudart"
    ):
        apply_flash_impl("fa3", 0.0, H100, installed_flash_packages())
    assert current_flash_attention_impl() is None

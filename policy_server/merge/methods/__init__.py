"""Merge-method registry. Importing this package registers every method module below."""

from policy_server.merge.methods.base import (  # noqa: F401
    METHODS,
    AdmitResult,
    MergeMethod,
    MergeResult,
    TensorContext,
    TensorState,
    build_options,
    get_method,
    register_method,
)

# One module per method; each registers itself on import.
import importlib as _importlib

for _mod in ("carve", "bank", "task_arithmetic", "ties", "dare", "tall_mask", "tsv",
             "resmerge", "magmax", "opcm",
             "iso_c",
             "iso_cts"):
    try:
        _importlib.import_module(f"policy_server.merge.methods.{_mod}")
    except ModuleNotFoundError as _e:  # a method module not written yet
        if _e.name != f"policy_server.merge.methods.{_mod}":
            raise

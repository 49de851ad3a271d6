import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run tests marked slow (simulators, large models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CARVE_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow suite: run with --runslow (CI runs it in its slow job)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "emulation: CUDA kernels run on the CPU emulator (slow, opt-in)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DSA_EXT_EMULATION") == "1":
        return
    skip = pytest.mark.skip(reason="CPU emulation of the CUDA kernels is slow: set DSA_EXT_EMULATION=1")
    for item in items:
        if item.get_closest_marker("emulation") is not None:
            item.add_marker(skip)

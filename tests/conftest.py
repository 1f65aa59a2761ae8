import os
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def seed(request):
    """Every test starts from a fixed seed of its own (derived from its id, so tests do not share
    inputs); DSA_EXT_SEED=<n> replays a test with another one. Printed, so a failure says it."""
    env = os.environ.get("DSA_EXT_SEED")
    value = int(env) if env is not None else zlib.crc32(request.node.nodeid.encode()) % 2**31
    torch.manual_seed(value)
    print(f"\n[{request.node.name}] DSA_EXT_SEED={value}")
    return value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker, not item.keywords: keywords also hold the path's folder names (a checkout
        # in a folder named "cuda" would skip every test)
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

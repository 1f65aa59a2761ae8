import os
import random

import pytest
import torch


@pytest.fixture
def seed(request):
    """A fresh seed per test (DSA_EXT_SEED pins it); printed so a failure can be replayed."""
    value = int(os.environ.get("DSA_EXT_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"\n[{request.node.name}] DSA_EXT_SEED={value}")
    return value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

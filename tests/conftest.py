import os
import subprocess
import sys
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def installed_env(tmp_path_factory):
    """The environment of a user's shell: no PYTHONPATH, so a program started in any directory
    imports dsa_ext the way the installed package resolves it. Skips unless that is this
    checkout (`make build` installs it editable; pytest alone does not)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", "import dsa_ext; print(dsa_ext.__file__)"], env=env,
                         cwd=tmp_path_factory.mktemp("anywhere"), capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip("dsa_ext is not installed for this Python (`make build` installs this checkout: "
                    "pip install --no-build-isolation --no-deps -e .): " + res.stderr.strip().splitlines()[-1])
    found = os.path.dirname(os.path.dirname(res.stdout.strip()))
    if not os.path.samefile(found, ROOT):
        pytest.skip(f"import dsa_ext finds the checkout {found}, not this one {ROOT} (`make build` here installs it)")
    return env

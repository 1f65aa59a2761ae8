"""The README as a newcomer follows it: its Python examples run as written, each in a fresh
interpreter started outside the repository without PYTHONPATH (so they also prove that `import
dsa_ext` works from anywhere once `make build` has installed it), and its C++ section is the
consumer project examples/cpp_consumer verbatim (ctest builds and runs that project against the
installed CMake package)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[0][:40])
def test_readme_example_runs(code, tmp_path, installed_env):
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=installed_env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "an example should print what it computed"


@pytest.mark.parametrize("language,path", [("cmake", "CMakeLists.txt"), ("cpp", "main.cpp")])
def test_cpp_section_is_the_consumer_project(language, path):
    with open(os.path.join(ROOT, "examples", "cpp_consumer", path)) as f:
        assert f.read() in blocks(language), f"README's ```{language} block differs from examples/cpp_consumer/{path}"

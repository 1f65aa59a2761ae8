"""Every program in python/ starts from any directory with the installed package alone (no
PYTHONPATH), and its --help gives every option a help text and, where it takes a value, its
default."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = sorted(p for p in glob.glob(os.path.join(ROOT, "python", "*.py"))
                  if 'if __name__ == "__main__"' in open(p).read())


def options(help_text):
    """(invocation, help) of every entry in the options section of argparse's --help."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", section.strip("\n"))
    out = []
    for entry in entries:
        first, *rest = entry.splitlines()
        invocation, _, inline = first.strip().partition("  ")
        out.append((invocation, " ".join([inline.strip(), *(line.strip() for line in rest)]).strip()))
    return out


def test_options_parser_finds_a_missing_help():
    text = "usage: x\n\noptions:\n  -h, --help  show this help message and exit\n  --n N\n  --m M       m (default: 1)\n"
    assert options(text) == [("-h, --help", "show this help message and exit"), ("--n N", ""),
                             ("--m M", "m (default: 1)")]


@pytest.mark.parametrize("program", PROGRAMS, ids=os.path.basename)
def test_program_help_runs_from_anywhere(program, tmp_path, installed_env):
    res = subprocess.run([sys.executable, program, "--help"], cwd=tmp_path, env=installed_env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for invocation, text in options(res.stdout):
        assert text, f"{invocation}: no help text"
        takes_value = not re.fullmatch(r"-[-\w]+(, -[-\w]+)*", invocation)
        assert not takes_value or "default" in text, f"{invocation}: the help does not say its default"

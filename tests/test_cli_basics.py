import sys

import smalto
from tests import forkrun


def _smalto(*args):
    return forkrun.run([sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = _smalto("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"smalto {smalto.__version__}"


def test_help_lists_the_program():
    r = _smalto("--help")
    assert r.returncode == 0 and "LLaMA-family" in r.stdout
    for command in (
        "train",
        "finetune",
        "dpo",
        "reward",
        "ppo",
        "eval",
        "generate",
        "chat",
        "convert",
        "serve",
    ):
        assert f"\n  {command} " in r.stdout, command


def test_unknown_command_is_a_usage_error():
    r = _smalto("frobnicate")
    assert r.returncode == 2 and "frobnicate" in r.stderr

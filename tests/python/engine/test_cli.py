"""`shardmarket engine generate|import-gguf`."""

from __future__ import annotations

import os
import subprocess
import sys

from shardmarket.cli import main


def test_generate_through_stages(tiny_checkpoints, capsys):
    assert (
        main(["engine", "generate", "--model", str(tiny_checkpoints["llama"]), "--stages", "3", "--max-tokens", "6", "hi"]) == 0
    )
    err = capsys.readouterr().err
    assert "6 tokens" in err and "[0,2) -> [2,3) -> [3,5)" in err


def test_bad_arguments_say_what_to_do(tiny_checkpoints, tmp_path, capsys):
    assert main(["engine", "generate", "--model", str(tiny_checkpoints["llama"]), "--stages", "9", "hi"]) == 1
    assert "number of stages must be within 1..5" in capsys.readouterr().err
    assert main(["engine", "import-gguf", str(tmp_path / "missing.gguf")]) == 1
    assert "is not a file" in capsys.readouterr().err


def _cli_openmp_policy(env_policy: str | None) -> list[str]:
    """The OMP_WAIT_POLICY a `shardmarket` process has once its command line is parsed, and whether torch (whose
    libgomp reads the policy once, when it loads) was still unloaded then."""
    code = (
        "import sys, os; from shardmarket.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": env_policy} if env_policy else {}
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()[-2:]


def test_every_command_waits_passively_unless_the_user_chose_a_policy():
    assert _cli_openmp_policy(None) == ["PASSIVE", "False"]  # set before torch loads, so libgomp sees it
    assert _cli_openmp_policy("ACTIVE") == ["ACTIVE", "False"]

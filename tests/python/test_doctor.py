import subprocess
import sys

from shardmarket import toolchain
from shardmarket.cli import doctor


def test_doctor_passes_on_a_set_up_machine():
    result = subprocess.run(
        [sys.executable, "-m", "shardmarket", "doctor"], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   solc" in result.stdout and "0.8.28" in result.stdout
    assert "all parts are present" in result.stdout


def test_doctor_without_solc_fails_and_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toolchain, "PROJECT_ROOT", tmp_path)  # a project whose node_modules lacks solc
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "FAIL solc" in out
    assert "fix: make setup" in out

"""`shardmarket engine generate|import-gguf`."""

from __future__ import annotations

from node.cli import main


def test_generate_through_stages(tiny_checkpoints, capsys):
    assert main(["engine", "generate", "--model", str(tiny_checkpoints["llama"]), "--stages", "3", "--max-tokens", "6", "hi"]) == 0
    err = capsys.readouterr().err
    assert "6 tokens" in err and "[0,2) -> [2,3) -> [3,5)" in err


def test_bad_arguments_say_what_to_do(tiny_checkpoints, tmp_path, capsys):
    assert main(["engine", "generate", "--model", str(tiny_checkpoints["llama"]), "--stages", "9", "hi"]) == 1
    assert "number of stages must be within 1..5" in capsys.readouterr().err
    assert main(["engine", "import-gguf", str(tmp_path / "missing.gguf")]) == 1
    assert "is not a file" in capsys.readouterr().err

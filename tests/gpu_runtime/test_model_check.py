"""gpu_runtime/model_check.py on its own (the registry runs it in the sandbox: tests/api/test_registry.py)."""

from __future__ import annotations

import json

from gpu_runtime.model_check import check_model_dir, main
from tests.tiny_model import tiny_model_files


def write(root, files):
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_report_and_command_line(tmp_path, capsys):
    d = write(tmp_path / "tiny", tiny_model_files())
    report = check_model_dir(d)
    assert (report["model_type"], report["parameters"], report["dtypes"]) == ("qwen2", 28960, ["float32"])
    assert (report["vocab_size"], report["tokenizer_size"]) == (320, 259)
    assert main([str(d)]) == 0
    assert json.loads(capsys.readouterr().out) == report


def test_a_tokenizer_bigger_than_the_vocabulary_is_invalid(tmp_path, capsys):
    files = tiny_model_files()
    config = {**json.loads(files["config.json"]), "vocab_size": 128}
    d = write(tmp_path / "tiny", {**files, "config.json": json.dumps(config).encode()})
    capsys.readouterr()  # transformers' own output while making the model
    assert main([str(d)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "invalid: the tokenizer has 259 tokens but the model's vocab_size is 128"

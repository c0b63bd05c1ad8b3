"""``kiln build | generate | inspect``: exit codes, output, and errors as one line (a traceback only with --debug)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln import LLM, SamplingParams
from kiln.cli import main
from kiln.errors import KilnError

TINY_FLAGS = ["--target", "cpu", "--dtype", "float32", "--max-batch-size", "2", "--max-input-len", "32",
              "--max-seq-len", "64", "--max-num-tokens", "48", "--tokens-per-block", "16"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, command: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"kiln {command}: error: ") and message in lines[-1], err
    assert "Traceback" not in err


def test_build_then_inspect(capsys, tiny_hf_checkpoint, tmp_path):
    checkpoint = tiny_hf_checkpoint("Qwen2ForCausalLM")
    engine_dir = tmp_path / "engine"
    code, out, _ = run(capsys, "build", str(checkpoint.path), "--output", str(engine_dir), *TINY_FLAGS)
    assert code == 0 and out.startswith(f"engine written to {engine_dir} (cpu, float32, ")

    code, out, _ = run(capsys, "inspect", str(engine_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"engine        {engine_dir}  (kiln ")
    assert lines[1] == "target        cpu (cpu), dtype float32, linear dense, tp 1"
    assert lines[2].startswith("model         Qwen2ForCausalLM: 2 layers, hidden 64, heads 4/2 kv x 16, mlp 96, vocab 128")
    assert lines[3] == ("limits        max_batch_size 2, max_input_len 32, max_seq_len 64, max_num_tokens 48, "
                        "tokens_per_block 16")
    for heading in ("memory plan", "kernel plan", "files"):
        assert heading in lines
    assert any(line.split()[:2] == ["attention", "reference"] for line in lines)
    assert any(line.split()[0] == "rank0.safetensors" for line in lines[lines.index("files"):])

    code, out, _ = run(capsys, "inspect", str(engine_dir), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["target"] == {"name": "cpu", "device": "cpu"}
    assert summary["limits"]["max_num_tokens"] == 48 and summary["model"]["qkv_bias"] is True
    assert summary["memory_plan"]["weight_bytes"] == 4 * sum(p.numel() for p in checkpoint.model.parameters())
    assert set(summary["files"]) == {"manifest.json", "rank0.safetensors"}


def test_generate_streams_the_same_text_as_the_api(capsys, stories_engine):
    code, out, _ = run(capsys, "generate", "--engine", str(stories_engine), "--max-tokens", "30", "Once upon a time")
    with LLM(stories_engine, progress=False) as llm:
        expected = llm.generate(["Once upon a time"], SamplingParams(max_tokens=30, temperature=0.0),
                                use_tqdm=False)[0].outputs[0].text
    assert code == 0 and out == "Once upon a time" + expected + "\n"


def test_generate_with_no_model_runs_the_bundled_one(capsys, isolated_engine_cache):
    code, out, _ = run(capsys, "generate", "--max-tokens", "12", "--temperature", "0.7", "--seed", "3", "Lily")
    assert code == 0 and out.startswith("Lily") and len(out) > len("Lily\n")
    assert any(isolated_engine_cache.glob("kiln/engines/stories260K-*/manifest.json"))  # built once, cached


@pytest.mark.parametrize("argv, command, message", [
    (["build", "{tmp}/nowhere", "--output", "{tmp}/engine"], "build", "no config.json"),
    (["build", "llama-3-8b", "--output", "{tmp}/engine"], "build",
     "llama-3-8b is a preset with no checkpoint; add --dummy-weights"),
    (["build", "{stories}", "--output", "{tmp}/engine", "--max-seq-len", "4096", "--target", "cpu"], "build",
     "max_seq_len=4096 exceeds the model's 512 positions"),
    (["build", "{stories}", "--output", "{tmp}/engine", "--tokens-per-block", "12"], "build",
     "tokens_per_block must be a power of two"),
    (["inspect", "{tmp}"], "inspect", "manifest.json: missing"),
    (["generate", "--engine", "{engine}", "--max-tokens", "1000", "Once upon a time"], "generate",
     "prompt (5 tokens) + max_tokens (1000) exceeds the engine's max_seq_len 512; lower max_tokens to 507"),
    (["generate", "--engine", "{engine}", "--top-p", "0", "Hi"], "generate", "top_p must be in (0, 1]"),
])
def test_errors_are_one_line_with_a_non_zero_exit(argv, command, message, capsys, tmp_path, stories_engine):
    from kiln.runtime.llm import DEFAULT_MODEL_DIR

    argv = [a.format(tmp=tmp_path, stories=DEFAULT_MODEL_DIR, engine=stories_engine) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert_one_line_error(err, command, message)
    assert out == ""


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(KilnError, match="no such engine folder"):
        main(["--debug", "inspect", str(tmp_path / "nowhere")])


def test_command_line_process_exits_non_zero_with_one_line(tmp_path):
    failed = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip() == (f"kiln inspect: error: {tmp_path / 'nowhere'}: no such engine folder; "
                                     "build one with kiln build")


def test_build_help_explains_each_limit(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--max-batch-size", "--max-input-len", "--max-seq-len", "--max-num-tokens", "--tokens-per-block",
                 "--dtype", "--target", "rebuild with a larger value"):
        assert flag in out

"""``kiln build | generate | inspect``: exit codes, output, and errors as one line (a traceback only with --debug)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.cli import main
from kiln.config import RuntimeConfig
from kiln.errors import KilnError
from kiln.runtime.llm import DEFAULT_MODEL_DIR

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
    assert lines[1] == "target        cpu (cpu), dtype float32, quantization none, kv_cache_dtype float32, tp 1"
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


@pytest.fixture(scope="module")
def engine_without_tokenizer(tmp_path_factory):
    """stories260K's shapes with random weights and no tokenizer, as ``kiln build PRESET --dummy-weights``."""
    from kiln import BuildConfig, Builder
    from kiln.convert import ModelSource
    from kiln.models import ModelConfig
    from kiln.runtime.llm import DEFAULT_MODEL_DIR

    source = ModelSource(ModelConfig.from_hf_dir(DEFAULT_MODEL_DIR), checkpoint_dir=None, tokenizer_dir=None,
                         name="stories-dummy")
    build = BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=64, max_num_tokens=64, target="cpu")
    return Builder().build(source, build).save(tmp_path_factory.mktemp("dummy_engine"), progress=False)


@pytest.mark.parametrize("has_tokenizer", [False, True])
def test_generate_from_token_ids(has_tokenizer, capsys, stories_engine, engine_without_tokenizer):
    engine = stories_engine if has_tokenizer else engine_without_tokenizer
    code, out, err = run(capsys, "generate", "--engine", str(engine), "--token-ids", "1,403,407", "--max-tokens", "6",
                         "--ignore-eos")
    with LLM(engine, progress=False) as llm:
        expected = llm.generate([[1, 403, 407]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    lines = out.splitlines()
    assert code == 0 and err == "" and lines[0] == ",".join(map(str, expected.token_ids))
    assert lines[1:] == ([expected.text] if has_tokenizer else [])  # the new tokens' text, given a tokenizer


def test_generate_text_or_token_ids(capsys, engine_without_tokenizer):
    code, _, err = run(capsys, "generate", "--engine", str(engine_without_tokenizer), "Hi")
    assert code == 1
    assert_one_line_error(err, "generate", "this engine has no tokenizer; give the prompt as token ids: --token-ids")
    code, _, err = run(capsys, "generate", "--engine", str(engine_without_tokenizer), "--token-ids", "1,2", "Hi")
    assert code == 1 and "give a PROMPT or --token-ids, not both" in err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--token-ids", "1,x"])
    assert exit_.value.code == 2 and "comma-separated token ids" in capsys.readouterr().err


def test_generate_with_no_model_runs_the_bundled_one(capsys, isolated_engine_cache):
    code, out, _ = run(capsys, "generate", "--max-tokens", "12", "--temperature", "0.7", "--seed", "3", "Lily")
    assert code == 0 and out.startswith("Lily") and len(out) > len("Lily\n")
    assert any(isolated_engine_cache.glob("kiln/engines/stories260K-*/manifest.json"))  # built once, cached


def test_generate_says_on_stderr_when_it_builds_an_engine_first(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    code, out, err = run(capsys, "generate", "--max-tokens", "4", "Lily")
    (engine_dir,) = (tmp_path / "engines").iterdir()
    assert code == 0 and out.startswith("Lily")  # stdout holds the text alone
    assert f"kiln: building an engine for {DEFAULT_MODEL_DIR} (first use; cached in {engine_dir})" in err
    code, out, err = run(capsys, "generate", "--max-tokens", "4", "Lily")
    assert code == 0 and "building" not in err


@pytest.mark.parametrize("argv, command, message", [
    (["build", "{tmp}/nowhere", "--output", "{tmp}/engine"], "build",
     "{tmp}/nowhere: neither a model folder nor a preset; give a Hugging Face model folder, or one of the "
     "presets with --dummy-weights: llama-2-7b, llama-3-8b, "),
    (["build", "llama-9b", "--dummy-weights", "--output", "{tmp}/engine"], "build",
     "llama-9b: neither a model folder nor a preset; give a Hugging Face model folder, or one of the presets "
     "with --dummy-weights: llama-2-7b, llama-3-8b, llama-3.1-8b, llama-3.2-1b, mistral-7b, qwen2.5-7b"),
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
    argv = [a.format(tmp=tmp_path, stories=DEFAULT_MODEL_DIR, engine=stories_engine) for a in argv]
    code, out, err = run(capsys, *argv)
    message = message.format(tmp=tmp_path)
    assert code == 1
    assert_one_line_error(err, command, message)
    assert out == ""


def test_a_corrupt_config_json_is_named_with_its_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 512,\n  "hidden_size": 64\n  "num_hidden_layers": 5\n}\n')
    code, _, err = run(capsys, "build", str(tmp_path), "--output", str(tmp_path / "engine"))
    assert code == 1
    assert_one_line_error(err, "build", f"{tmp_path / 'config.json'} line 4 column 3: not valid JSON "
                                        "(Expecting ',' delimiter); fix the file or download it again")


def test_build_output_is_checked_before_building_and_never_clobbers(capsys, tmp_path):
    from kiln.runtime.llm import DEFAULT_MODEL_DIR

    build = ["build", str(DEFAULT_MODEL_DIR), *TINY_FLAGS, "--output"]
    (tmp_path / "a_file").write_text("")
    code, _, err = run(capsys, *build, str(tmp_path / "a_file"))
    assert code == 1
    assert_one_line_error(err, "build", f"{tmp_path / 'a_file'}: a file, not a folder; give a folder for the engine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    code, _, err = run(capsys, *build, str(tmp_path / "mine"), "--overwrite")
    assert code == 1
    assert_one_line_error(err, "build", "holds files that are not an engine's: notes.txt; kiln does not replace them")
    assert run(capsys, *build, str(tmp_path / "engine"))[0] == 0
    code, _, err = run(capsys, *build, str(tmp_path / "engine"))
    assert code == 1
    assert_one_line_error(err, "build", f"{tmp_path / 'engine'} already holds an engine; add --overwrite")
    assert run(capsys, *build, str(tmp_path / "engine"), "--overwrite")[0] == 0


@pytest.mark.parametrize("error, message", [
    (FileExistsError(17, "File exists", "/o/x"), "cannot write /o/x: a file is in the way; remove it or choose "
                                                 "another path"),
    (OSError(30, "Read-only file system", "/o/x"), "cannot write /o/x: read-only file system; choose a path on a "
                                                   "writable one"),
    (OSError(28, "No space left on device"), "cannot write /o/x: no space left on the device; free some space or "
                                             "write elsewhere"),
    (NotADirectoryError(20, "Not a directory", "/o"), "cannot write /o/x (/o): part of the path is a file, not a "
                                                      "folder; choose another path"),
    (PermissionError(13, "Permission denied", "/o/x"), "cannot write /o/x: permission denied; choose a folder you "
                                                       "can write to"),
    (OSError(5, "Input/output error", "/o/x"), "cannot write /o/x: input/output error; choose another path"),
])
def test_output_path_errors_name_the_path_and_the_fix(error, message):
    from kiln.errors import cannot_write

    assert str(cannot_write("/o/x", error)) == message


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_prepare_dataset_on_a_full_disk(capsys, stories_engine):
    code, _, err = run(capsys, "bench", "prepare-dataset", "--engine", str(stories_engine), "-o", "/dev/full",
                       "token-norm-dist", "--num-requests", "4", "--input-mean", "8", "--output-mean", "2")
    assert code == 1
    assert_one_line_error(err, "bench", "cannot write /dev/full: no space left on the device; free some space or "
                                        "write elsewhere")


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


def start_cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("command", ["generate", "inspect", "prepare-dataset"])
def test_a_closed_stdout_ends_the_command_quietly(command, stories_engine):
    """``kiln ... | head``: the reader leaves early; kiln stops without a message and exits 141, as
    Unix tools that SIGPIPE ends do."""
    engine = str(stories_engine)
    argv, read_first = {
        "generate": (["generate", "--engine", engine, "--max-tokens", "500", "--ignore-eos", "Once upon"], True),
        "inspect": (["inspect", engine], False),  # its output fits a pipe's buffer: close before it writes
        "prepare-dataset": (["bench", "prepare-dataset", "--engine", engine, "token-norm-dist", "--num-requests",
                             "2000", "--input-mean", "100", "--output-mean", "10"], True),
    }[command]
    process = start_cli(*argv)
    if read_first:
        assert process.stdout.read(1)  # something was written, then the reader goes (head -c 1)
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert err.decode() == "" and process.returncode == 141


def test_ctrl_c_exits_130_with_one_line(stories_engine):
    import signal

    process = start_cli("generate", "--engine", str(stories_engine), "--max-tokens", "500", "--ignore-eos", "Once")
    assert process.stdout.read(1)  # generating
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert err.decode() == "kiln generate: interrupted\n" and process.returncode == 130


RUNTIME_COMMANDS = {"serve": ["serve"], "generate": ["generate", "Hi"],
                    "bench throughput": ["bench", "throughput", "--engine", "e", "--dataset", "d"],
                    "bench latency": ["bench", "latency", "--engine", "e", "--dataset", "d"]}


def runtime_fields(config_class=RuntimeConfig, path=()):
    """(path, default) of each leaf field of RuntimeConfig and the configs nested in it."""
    for f in dataclasses.fields(config_class):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from runtime_fields(type(default), path + (f.name,))
        else:
            yield path + (f.name,), default


def field_value(config, path):
    for name in path:
        config = getattr(config, name)
    return config


@pytest.mark.parametrize("command", RUNTIME_COMMANDS)
def test_every_runtime_field_is_a_flag_and_reaches_the_config(command):
    from kiln.cli import build_parser
    from kiln.flags import runtime_config_from_args, runtime_flags

    flags = {rf.path: rf for rf in runtime_flags()}
    assert set(flags) == {path for path, _ in runtime_fields()}
    parser = build_parser()
    assert runtime_config_from_args(parser.parse_args(RUNTIME_COMMANDS[command])) == RuntimeConfig()
    for path, default in runtime_fields():
        rf = flags[path]
        if rf.type is bool:
            argv, value = [rf.flag.replace("--", "--no-") if default else rf.flag], not default
        elif rf.choices:
            value = next(c for c in rf.choices if c != default)
            argv = [rf.flag, value]
        else:
            value = {int: 3, float: 0.5, str: "cpu"}[rf.type]
            argv = [rf.flag, str(value)]
        config = runtime_config_from_args(parser.parse_args(RUNTIME_COMMANDS[command] + argv))
        assert field_value(config, path) == value != default, (command, argv)


def test_a_misspelt_capacity_policy_fails_listing_the_policies(capsys):
    from kiln.cli import build_parser
    from kiln.config import CapacityPolicy, SchedulerConfig
    from kiln.errors import ConfigError
    from kiln.runtime.kv_cache import BlockPool
    from kiln.runtime.scheduler import Scheduler

    listed = "guaranteed_no_evict, max_utilization"
    assert SchedulerConfig("max_utilization").capacity_scheduler_policy is CapacityPolicy.MAX_UTILIZATION
    for make in (lambda: SchedulerConfig("max_utilisation"),
                 lambda: Scheduler(BlockPool(4, 4), 1, 8, 16, policy="max_utilisation")):
        with pytest.raises(ConfigError, match=f"'max_utilisation' is not supported; choose one of {listed}"):
            make()
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--scheduler-policy", "max_utilisation"])
    assert exit_.value.code == 2
    assert "invalid choice: 'max_utilisation' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize("command", RUNTIME_COMMANDS)
def test_runtime_flags_reach_the_engine_of_each_command(command, capsys, stories_engine, tmp_path):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"task_id": 0, "input_ids": [5, 6, 7], "output_tokens": 2}\n')
    argv = {"serve": ["serve", str(stories_engine), "--port", "0"],
            "generate": ["generate", "--engine", str(stories_engine), "Hi"]}.get(command)
    argv = argv or RUNTIME_COMMANDS[command][:2] + ["--engine", str(stories_engine), "--dataset", str(dataset)]
    code, _, err = run(capsys, *argv, "--max-num-tokens", "8", "--no-enable-chunked-context")
    assert code == 1
    assert_one_line_error(err, command.split()[0], "max_num_tokens=8 is below max_input_len=128, so long prompts "
                                                   "need chunked context")

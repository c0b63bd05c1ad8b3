"""Tensor parallelism on the CPU: 2 ranks over gloo, against the same model at one rank.

Engines are built at tp 1 and tp 2 from the same weights; tp 2 runs in two processes (kiln starts rank 1,
or torchrun-style variables name both) and must give the tokens of tp 1 and its log-probabilities within
float32 tolerance (the sums of the row-parallel layers run in another order), for the bundled stories260K
(8 heads over 4 KV heads) and tiny Hugging Face configs (MQA's one KV head replicated, GPT-J's parallel
attention + MLP with biases, a vocabulary that does not split evenly). A rank that dies ends the others
with a clear error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES_DIR, build_engine
from kiln import LLM, BuildConfig, SamplingParams
from kiln.builder import resolve_build_config
from kiln.cli import main
from kiln.engine import EngineManifest
from kiln.errors import ConfigError, EngineError, RankFailure
from kiln.models.config import ModelConfig
from kiln.runtime.distributed import check_devices, decode, encode

LOGPROB_ATOL = 1e-4  # float32; measured max |diff| ~3e-6 (the ranks' partial sums added in another order)
PROMPTS = [[1, 403, 407, 261, 378, 46, 385], [1, 365, 1191 % 512, 72, 9, 300, 7, 7, 7, 100, 44]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, prompt_logprobs=5)


def stories_engines(tmp_path: Path, **build) -> tuple[Path, Path]:
    limits = dict(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=64, tokens_per_block=8, **build)
    return tuple(build_engine(STORIES_DIR, tmp_path / f"tp{tp}", tp_size=tp, **limits) for tp in (1, 2))


def run(engine: Path, prompts=PROMPTS, params=GREEDY):
    with LLM(engine, progress=False) as llm:
        return llm.generate(prompts, params, use_tqdm=False)


def assert_same_outputs(tp1, tp2):
    for a, b in zip(tp1, tp2):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for entries_a, entries_b in ((a.outputs[0].logprobs, b.outputs[0].logprobs),
                                     (a.prompt_logprobs[1:], b.prompt_logprobs[1:])):
            for ea, eb in zip(entries_a, entries_b, strict=True):
                assert ea.keys() == eb.keys()
                assert max(abs(ea[t] - eb[t]) for t in ea) < LOGPROB_ATOL


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    return stories_engines(tmp_path_factory.mktemp("tp_stories"))


def test_stories260k_at_tp2_gives_tp1s_tokens_and_logprobs(stories):
    tp1, tp2 = stories
    out1, out2 = run(tp1), run(tp2)
    assert_same_outputs(out1, out2)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in out2)


def test_each_rank_holds_its_slices_with_checksums(stories):
    tp1, tp2 = stories
    whole = load_file(tp1 / "rank0.safetensors")
    ranks = [load_file(tp2 / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == whole.keys()
    m = EngineManifest.read(tp2)
    assert m.tp_size == 2 and all(len(t["crc32"]) == 2 for t in m.tensors.values())
    assert json.loads((tp2 / "manifest.json").read_text())["files"]["weights"] == ["rank0.safetensors",
                                                                                  "rank1.safetensors"]
    # Q of heads 0-3 then 4-7; K and V of KV heads 0-1 then 2-3 (8 heads of 8 dims over 4 KV heads).
    qkv = whole["layers.0.attn.qkv.weight"]
    q, k, v = qkv[:64], qkv[64:96], qkv[96:]
    for r in range(2):
        expected = torch.cat([q[32 * r:32 * (r + 1)], k[16 * r:16 * (r + 1)], v[16 * r:16 * (r + 1)]])
        assert torch.equal(ranks[r]["layers.0.attn.qkv.weight"], expected)
    assert m.sharding["layers.0.attn.qkv.weight"]["ranks"][1] == [[32, 64], [80, 96], [112, 128]]
    # Row-parallel: the input columns split; the embedding (tied LM head) by vocabulary rows.
    assert torch.equal(torch.cat([r["layers.0.mlp.down.weight"] for r in ranks], 1), whole["layers.0.mlp.down.weight"])
    assert torch.equal(torch.cat([r["embed.weight"] for r in ranks]), whole["embed.weight"])
    assert torch.equal(ranks[1]["norm.weight"], whole["norm.weight"])  # replicated
    assert m.memory_plan["kv_bytes_per_token"] * 2 == EngineManifest.read(tp1).memory_plan["kv_bytes_per_token"]


def test_a_damaged_rank_file_is_named(stories, tmp_path):
    import shutil

    engine = Path(shutil.copytree(stories[1], tmp_path / "engine"))
    data = bytearray((engine / "rank1.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (engine / "rank1.safetensors").write_bytes(bytes(data))
    with pytest.raises(RankFailure, match=r"tensor-parallel rank 1 stopped \(exit status 1\): .*rank1.safetensors: "
                                          "checksum mismatch"):
        LLM(engine, progress=False)


def test_kiln_inspect_shows_the_ranks(stories, capsys):
    assert main(["inspect", str(stories[1])]) == 0
    out = capsys.readouterr().out
    assert "tp 2" in out and "tensor parallel 2 ranks, one weight file each" in out
    assert "rank1.safetensors" in out and "memory plan (per rank)" in out


# name -> (architecture, HF config overrides): KV heads split (GQA), replicated (MQA), GPT-J's parallel
# block with biases, row-parallel biases added once, and a vocabulary padded to a multiple of the ranks.
HF_CASES = {
    "llama_gqa_untied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mqa_attention_bias": ("LlamaForCausalLM", dict(num_key_value_heads=1, attention_bias=True)),
    "qwen2_odd_vocab": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, vocab_size=127, tie_word_embeddings=True)),
    "gptj": ("GPTJForCausalLM", dict(rotary_dim=8, n_inner=96)),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_models_at_tp2_give_tp1s_tokens_and_logprobs(case, tiny_hf_checkpoint, tiny_engine):
    architecture, overrides = HF_CASES[case]
    checkpoint = tiny_hf_checkpoint(architecture, **overrides)
    prompts = [[3, 17, 99, 5, 64, 12, 8, 120], [7, 7, 30, 2, 90]]
    tp1, tp2 = (tiny_engine(checkpoint.path, tp_size=tp) for tp in (1, 2))
    assert_same_outputs(run(tp1, prompts), run(tp2, prompts))


@pytest.mark.parametrize("quantization, tensor, shape", [
    ("int4_wo", "layers.0.mlp.down.qweight", (64, 128 // 8)),  # 86 inputs per rank, padded to 128, 8 per int32
    ("int8_wo", "layers.0.mlp.gate_up.qweight", (172, 64)),    # 86 gate + 86 up rows per rank
    ("fp8", "layers.0.attn.o.weight_scale", (64, 1)),           # a scale per output row, the rows not split
])
def test_quantized_methods_convert_each_ranks_slice(tmp_path, quantization, tensor, shape):
    """Each rank quantizes its own float slice (int4_wo: its K padded to whole groups of 128 per rank)."""
    _, tp2 = stories_engines(tmp_path, quantization=quantization)
    assert all(load_file(tp2 / f"rank{r}.safetensors")[tensor].shape == shape for r in range(2))
    out = run(tp2, params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=8, num_kv_heads=4, tp=3), r"tp_size=3 \(--tp-size 3\): the model's 8 attention heads "
                                              r"\(num_attention_heads\) do not split over 3 ranks"),
    (dict(num_heads=12, num_kv_heads=4, tp=3), r"4 KV heads \(num_key_value_heads\) neither split over 3 ranks"),
    (dict(num_heads=8, num_kv_heads=8, tp=8), r"MLP width 172 \(intermediate_size\) does not split over 8 ranks"),
])
def test_build_refuses_a_tp_size_the_model_does_not_split_into(overrides, message):
    tp = overrides.pop("tp")
    model = replace(ModelConfig.from_hf_dir(STORIES_DIR), **overrides)
    with pytest.raises(ConfigError, match=message):
        resolve_build_config(model, BuildConfig(tp_size=tp, target="cpu"))


def test_config_errors_name_the_field_and_the_flag(stories, monkeypatch):
    with pytest.raises(ConfigError, match=r"tp_size=2 \(--tp-size 2\): quantization='int4_awq' .* does not split "
                                          "over ranks yet; build with --tp-size 1"):
        resolve_build_config(ModelConfig.from_hf_dir(STORIES_DIR), BuildConfig(tp_size=2, quantization="int4_awq",
                                                                                target="cpu"))
    with pytest.raises(ConfigError, match=r"tp_size \(--tp-size\) must be a positive integer"):
        BuildConfig(tp_size=0)
    with pytest.raises(ConfigError, match="tensor_parallel_size=1, but .* is built for tp_size=2"):
        LLM(stories[1], tensor_parallel_size=1)
    m = EngineManifest.read(stories[1])
    gpu = replace(m, build_config=m.build_config.replace(target="sm90"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EngineError, match=r"built for tp_size=2: its 2 rank\(s\) on this machine need 2 GPUs, 1 "
                                          "visible; rebuild it with a smaller --tp-size"):
        check_devices(gpu, stories[1], 2)


def test_llm_builds_a_tp2_engine_from_a_hugging_face_folder(stories):
    with LLM(STORIES_DIR, tensor_parallel_size=2, progress=False, build_config=dict(max_seq_len=128, target="cpu"),
             ) as llm:
        assert llm.executor.engine.manifest.tp_size == 2
        out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in run(stories[0])]


def test_step_messages_are_plain_data():
    import numpy as np

    payload = encode("step", {"n": 3, "lens": [1, 2], "host": np.arange(6, dtype=np.int64).reshape(2, 3)})
    assert payload.dtype == torch.uint8
    method, args = decode(payload)
    assert method == "step" and args["n"] == 3 and args["lens"] == [1, 2]
    assert args["host"].tolist() == [[0, 1, 2], [3, 4, 5]]


# ---- failures: a dead rank ends every rank, with a clear error ----------------------------------------------

def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_rank_fails_requests_with_a_clear_error(stories):
    llm = LLM(stories[1], progress=False)
    worker = llm.executor.ranks.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    with pytest.raises(RankFailure, match=r"tensor-parallel rank 1 stopped \(signal 9\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with pytest.raises(RankFailure):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.shutdown()


def test_a_rank_killed_mid_generation_ends_the_run(stories):
    llm = LLM(stories[1], progress=False)
    worker = llm.executor.ranks.workers[0]

    def kill_at_step(stats):
        if stats.iteration == 3:
            os.kill(worker.pid, signal.SIGKILL)

    llm.executor.on_step = kill_at_step
    with pytest.raises(RankFailure, match="rank 1 stopped|ranks may disagree"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    assert not llm.executor.is_alive()


def test_shutdown_ends_every_rank(stories):
    with LLM(stories[1], progress=False) as llm:
        ranks = llm.executor.ranks
        worker = ranks.workers[0]
        groups = [weakref.ref(ranks.tp.group), weakref.ref(ranks.channel.group)]
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert worker.poll() == 0
    # The process groups are freed by the shutdown, the engine still held: freed at interpreter exit, a
    # gloo thread finishing a collective aborted the process (test_a_script_under_torchrun_runs_on_rank_0_only).
    assert [group() for group in groups] == [None, None]


def test_ranks_end_when_rank_0_is_killed(stories):
    script = ("import os, sys; from kiln import LLM; llm = LLM(sys.argv[1], progress=False); "
              "print(llm.executor.ranks.workers[0].pid, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(stories[1])], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    worker_pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    assert wait_gone(worker_pid)


# ---- kiln generate / serve / bench on a tp-2 engine, and torchrun-style launches ---------------------------

def tp1_text(stories, prompt: str = "Once upon a time", max_tokens: int = 10) -> str:
    """What ``kiln generate`` prints for ``prompt`` (greedy) with the tp-1 engine."""
    out = run(stories[0], [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return f"{prompt}{out[0].outputs[0].text}\n"


def test_kiln_generate_starts_both_ranks(stories):
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "--engine", str(stories[1]), "--max-tokens",
                           "10", "Once upon a time"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == tp1_text(stories)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_style_nodes_run_the_same_command(stories):
    """torchrun's variables, one rank per "node" (LOCAL_WORLD_SIZE 1): rank 0 runs kiln generate, rank 1
    the same command, which serves rank 0's steps."""
    port = free_port()
    command = [sys.executable, "-m", "kiln.cli", "generate", "--engine", str(stories[1]), "--max-tokens", "10",
               "Once upon a time"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == tp1_text(stories) and results[1][0] == ""


def test_serve_and_bench_run_a_tp2_engine(stories, tmp_path, capsys):
    import httpx

    from conftest import ServerProcess

    server = ServerProcess(str(stories[1]))
    try:
        with httpx.Client(timeout=60) as http:
            reply = http.post(f"{server.url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8,
                                                                     "temperature": 0}).json()
        assert reply["usage"]["completion_tokens"] == 8
    finally:
        assert server.stop() == 0, server.logs()
    dataset, report = tmp_path / "dataset.jsonl", tmp_path / "report.json"
    assert main(["bench", "prepare-dataset", "--engine", str(stories[1]), "-o", str(dataset), "token-norm-dist",
                 "--num-requests", "4", "--input-mean", "16", "--output-mean", "8"]) == 0
    assert main(["bench", "throughput", "--engine", str(stories[1]), "--dataset", str(dataset), "--warmup", "0",
                 "--report-json", str(report)]) == 0
    performance = json.loads(report.read_text())["performance"]
    assert performance["output_throughput_per_gpu_tok_s"] == pytest.approx(
        performance["system_output_throughput_tok_s"] / 2)


def test_ctrl_c_ends_kiln_serve_and_its_ranks(stories):
    """A terminal's Ctrl-C (SIGINT to the whole process group): rank 0 shuts down, which ends rank 1."""
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(stories[1]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "http://" in proc.stdout.readline()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # any process left in the group (rank 1)?
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("a rank outlived kiln serve")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL at one rank tests nothing)")
def test_two_gpus_give_one_gpus_tokens_and_logprobs(tmp_path):
    """NCCL between two GPUs, all-reduces captured in the decode CUDA graphs (float32: the tolerance above)."""
    tp1, tp2 = stories_engines(tmp_path, target="auto", dtype="float32")
    assert EngineManifest.read(tp2).target != "cpu"
    assert_same_outputs(run(tp1), run(tp2))


def test_a_script_under_torchrun_runs_on_rank_0_only(stories):
    """LLM(ENG) on a rank other than 0 runs rank 0's steps and then ends the process: the rest of the script
    runs at rank 0 alone. No thread of kiln's outlives the shutdown: one that dropped the last reference to a
    process group as the interpreter exited aborted rank 0 (test_two_torchrun_style_nodes_run_the_same_command)."""
    port = free_port()
    script = ("import sys, threading; from kiln import LLM, SamplingParams; llm = LLM(sys.argv[1], progress=False); "
              "out = llm.generate([[1, 403, 407]], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False); "
              "print(out[0].outputs[0].token_ids); llm.shutdown(); "
              "print([t.name for t in threading.enumerate() if t.name.startswith('kiln')])")
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(stories[1])], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    expected = run(stories[0], [[1, 403, 407]], SamplingParams(max_tokens=6, temperature=0.0))
    assert results[0][0] == f"{expected[0].outputs[0].token_ids}\n[]\n" and results[1][0] == ""


def test_a_prequantized_fp8_checkpoint_is_sliced_as_stored(tmp_path):
    """A compressed-tensors FP8 checkpoint (a scale per row): each rank stores its rows' bytes and scales as
    the checkpoint has them, nothing requantized."""
    from test_fp8_prequantized import write_checkpoint

    write_checkpoint(tmp_path / "fp8", "compressed_tensors")
    tp1, tp2 = (build_engine(tmp_path / "fp8", tmp_path / f"tp{tp}", tp_size=tp, max_input_len=32, max_seq_len=64)
                for tp in (1, 2))
    def read(engine: Path, rank: int) -> dict[str, torch.Tensor]:  # e4m3 as bytes: compared exactly
        tensors = load_file(engine / f"rank{rank}.safetensors")
        return {k: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for k, t in tensors.items()}

    whole, rank1 = read(tp1, 0), read(tp2, 1)
    rows = torch.cat([torch.arange(32, 64), torch.arange(80, 96), torch.arange(112, 128)])  # Q, K, V of rank 1
    for name in ("layers.0.attn.qkv.weight", "layers.0.attn.qkv.weight_scale"):
        assert torch.equal(rank1[name], whole[name][rows])
    assert torch.equal(rank1["layers.0.mlp.down.weight"], whole["layers.0.mlp.down.weight"][:, 86:])
    out = run(tp2, params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)

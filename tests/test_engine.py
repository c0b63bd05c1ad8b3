"""Engines: build validation, the folder on disk and its manifest, loading checks with their clear errors,
and the engine's limits enforced per request by the executor."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_BUILD
from kiln import LLM, BuildConfig, Builder, Executor, Request, SamplingParams
from kiln.convert import AutoModelForCausalLM
from kiln.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE, EngineManifest
from kiln.engine.target import resolve_dtype
from kiln.errors import ConfigError, EngineError
from kiln.kernels import LLAMA_OPS
from kiln.runtime.loader import load_engine
from kiln.version import ENGINE_FORMAT_VERSION, __version__


@pytest.fixture
def tiny_llama(tiny_hf_checkpoint):
    return tiny_hf_checkpoint("LlamaForCausalLM")


def test_engine_folder_holds_a_json_manifest_and_standard_safetensors(tiny_llama, tiny_engine):
    engine_dir = tiny_engine(tiny_llama.path)
    assert sorted(p.name for p in engine_dir.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]  # no tokenizer here

    manifest = json.loads((engine_dir / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == ENGINE_FORMAT_VERSION and manifest["kiln_version"] == __version__
    assert manifest["target"] == {"name": "cpu", "device_name": "cpu"}
    assert manifest["build_config"] == BuildConfig(**TINY_BUILD, quantization="none",  # "auto" resolved
                                                   kv_cache_dtype="float32").to_dict()
    assert manifest["model_config"]["architecture"] == "LlamaForCausalLM"
    assert manifest["model_config"]["num_kv_heads"] == 2
    assert manifest["files"] == {"weights": [WEIGHTS_FILE]} and manifest["sharding"] == {}
    assert set(manifest["kernel_plan"]) == set(LLAMA_OPS)  # the ops stories260K (a Llama) calls
    plan = manifest["memory_plan"]
    config = tiny_llama.model.config
    assert plan["weight_bytes"] == 4 * sum(p.numel() for p in tiny_llama.model.parameters())
    assert plan["kv_bytes_per_token"] == 2 * config.num_hidden_layers * config.num_key_value_heads * 16 * 4

    # Any safetensors reader opens the weights; the manifest's checksums are CRC32s of their bytes.
    with safe_open(str(engine_dir / WEIGHTS_FILE), framework="pt") as f:
        assert set(f.keys()) == set(manifest["tensors"])
        for name, entry in manifest["tensors"].items():
            tensor = f.get_tensor(name)
            assert list(tensor.shape) == entry["shape"] and entry["dtype"] == "F32"
            assert zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes()) == entry["crc32"]

    assert EngineManifest.read(engine_dir).build_config == BuildConfig(**TINY_BUILD, quantization="none",
                                                                       kv_cache_dtype="float32")


def test_saved_engine_loads_and_runs_like_a_fresh_build(tiny_llama, tiny_engine):
    prompt = [5, 17, 3, 99, 42]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    first = tiny_engine(tiny_llama.path)
    second = tiny_engine(tiny_llama.path, dtype="float32", max_batch_size=2)
    with LLM(first, progress=False) as a, LLM(second, progress=False) as b:
        assert (a.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
                == b.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    assert (first / WEIGHTS_FILE).read_bytes() == (second / WEIGHTS_FILE).read_bytes()


def test_llm_on_a_hugging_face_folder_builds_once_into_the_cache(tiny_llama, isolated_engine_cache, capsys):
    with LLM(tiny_llama.path, progress=False) as llm:
        engine_dir = llm.engine_dir
    built = (engine_dir / MANIFEST_FILE).stat().st_mtime_ns
    assert engine_dir.parent == isolated_engine_cache / "kiln" / "engines"
    out, err = capsys.readouterr()  # the first use says so, on stderr
    assert out == "" and err == f"kiln: building an engine for {tiny_llama.path} (first use; cached in {engine_dir})\n"
    with LLM(tiny_llama.path, progress=False) as llm:
        assert llm.engine_dir == engine_dir
    assert (engine_dir / MANIFEST_FILE).stat().st_mtime_ns == built
    assert capsys.readouterr() == ("", "")


def test_kiln_cache_dir_moves_the_engine_cache_and_an_unwritable_one_says_how(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln_cache"))
    with LLM(tiny_llama.path, progress=False) as llm:
        assert llm.engine_dir.parent == tmp_path / "kiln_cache" / "engines"
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("KILN_CACHE_DIR", str(blocked))
    with pytest.raises(ConfigError, match=f"engine cache {blocked / 'engines'} is not writable .*; set KILN_CACHE_DIR "
                                          "to a writable folder, or build with kiln build --output DIR"):
        LLM(tiny_llama.path, progress=False)


def test_no_pickle_anywhere_in_an_engine(stories_engine):
    files = [p for p in stories_engine.rglob("*") if p.is_file()]
    assert {p.relative_to(stories_engine).as_posix() for p in files} >= {MANIFEST_FILE, WEIGHTS_FILE,
                                                                         "tokenizer/tokenizer.json"}
    for path in files:
        head = path.read_bytes()[:2]
        assert head != b"PK" and not head.startswith(b"\x80"), f"{path} looks like a pickle or torch.save zip"


# ---- damaged or foreign engines ---------------------------------------------------------------------

def _edit_manifest(engine_dir, edit) -> None:
    path = engine_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _truncate(engine_dir):
    path = engine_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])


def _flip_one_byte(engine_dir):
    path = engine_dir / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# A GPU architecture this machine does not have.
OTHER_GPU = "sm80" if torch.cuda.is_available() and torch.cuda.get_device_capability() != (8, 0) else "sm90"


def _retarget_to_other_gpu(engine_dir):
    def change(m):
        m["target"] = {"name": OTHER_GPU, "device_name": "the build machine's GPU"}
        m["build_config"]["target"] = OTHER_GPU
    _edit_manifest(engine_dir, change)


DAMAGES = {
    "truncated weights": (_truncate, rf"{WEIGHTS_FILE}: file is \d+ bytes, expected \d+ \(truncated or altered\)"),
    "truncated header": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x10\x00"), rf"{WEIGHTS_FILE}: truncated"),
    "altered bytes": (_flip_one_byte, rf"{WEIGHTS_FILE}: checksum mismatch in layers\.\d\.[\w.]+\.weight"),
    "missing weights": (lambda d: (d / WEIGHTS_FILE).unlink(), rf"{WEIGHTS_FILE}: missing; rebuild the engine"),
    "missing manifest": (lambda d: (d / MANIFEST_FILE).unlink(), rf"{MANIFEST_FILE}: missing"),
    "manifest not json": (lambda d: (d / MANIFEST_FILE).write_text("{"), rf"{MANIFEST_FILE}: not valid JSON"),
    "newer format": (lambda d: _edit_manifest(d, lambda m: m.update(format_version=ENGINE_FORMAT_VERSION + 1)),
                     rf"format_version {ENGINE_FORMAT_VERSION + 1} is newer than this kiln reads"),
    "older format": (lambda d: _edit_manifest(d, lambda m: m.update(format_version=0)),
                     "format_version 0 is older than this kiln's"),
    "field missing": (lambda d: _edit_manifest(d, lambda m: m.pop("tensors")), "field 'tensors' missing or invalid"),
    "another GPU": (_retarget_to_other_gpu, rf"engine was built for {OTHER_GPU} \(the build machine's GPU\) but "
                    r"this (machine has no GPU|GPU is sm\d+)"),
    "target fields disagree": (lambda d: _edit_manifest(d, lambda m: m["target"].update(name="sm90")),
                               "target.name 'sm90' disagrees with build_config.target 'cpu'"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_or_foreign_engine_fails_with_one_clear_line(damage, tiny_llama, tiny_engine):
    engine_dir = tiny_engine(tiny_llama.path)
    apply, message = DAMAGES[damage]
    apply(engine_dir)
    with pytest.raises(EngineError, match=message) as error:
        Executor(engine_dir)
    assert "\n" not in str(error.value) and "rebuild" in str(error.value)


def test_folder_that_is_no_engine_is_named(tmp_path, tiny_llama, tiny_engine):
    with pytest.raises(EngineError, match="no such engine folder"):
        Executor(tmp_path / "nowhere")
    engine_dir = tiny_engine(tiny_llama.path)
    (engine_dir / MANIFEST_FILE).unlink()  # what a build that stopped half-way leaves
    with pytest.raises(EngineError, match=r"manifest.json: missing \(incomplete build"):
        LLM(engine_dir, progress=False)
    with pytest.raises(ConfigError, match=r"neither an engine folder \(manifest.json\) nor a Hugging Face model"):
        LLM(tmp_path, progress=False)


def test_save_replaces_an_engine_only_when_told_and_never_other_files(tiny_llama, tmp_path):
    engine = Builder().build(AutoModelForCausalLM.from_hugging_face(tiny_llama.path), BuildConfig(**TINY_BUILD))
    engine.save(tmp_path / "empty_before", progress=False)  # a missing folder is made
    (tmp_path / "empty").mkdir()
    engine.save(tmp_path / "empty", progress=False)
    with pytest.raises(EngineError, match="already holds an engine; add --overwrite"):
        engine.save(tmp_path / "empty", progress=False)
    stale = tmp_path / "empty" / "triton_cache"
    stale.mkdir()
    engine.save(tmp_path / "empty", overwrite=True, progress=False)
    assert not stale.exists() and EngineManifest.read(tmp_path / "empty")  # replaced whole, old kernels too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(EngineError, match="holds files that are not an engine's: notes.txt; kiln does not "
                                              "replace them"):
            engine.save(tmp_path / "other", overwrite=overwrite, progress=False)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


# ---- build validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(tp_size=0), r"tp_size \(--tp-size\) must be a positive integer"),
    (dict(max_input_len=256, max_seq_len=128), r"max_input_len \(256\) must be <= max_seq_len \(128\)"),
    (dict(tokens_per_block=12), "tokens_per_block must be a power of two"),
    (dict(dtype="float8"), "dtype 'float8' is not supported; choose one of auto, float32, float16, bfloat16"),
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
])
def test_build_config_errors_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(**{**TINY_BUILD, **overrides})


def test_dtype_auto_keeps_the_checkpoints_where_the_target_runs_it():
    assert resolve_dtype("auto", "bfloat16", "sm90") == "bfloat16"
    assert resolve_dtype("auto", "float16", "cpu") == "float32"  # CPU float16 matmuls are slow or missing
    assert resolve_dtype("float16", "bfloat16", "sm80") == "float16"
    for dtype in ("auto", "bfloat16"):  # a detected pre-Ampere GPU (T4 is sm75)
        with pytest.raises(ConfigError, match=r"bfloat16 needs compute capability 8.0 or newer \(target sm75\); "
                                              r"build with dtype='float16' \(--dtype float16\)"):
            resolve_dtype(dtype, "bfloat16", "sm75")


def test_max_seq_len_beyond_positions_fails_unless_rope_scaling_allows_it(tiny_hf_checkpoint):
    plain = AutoModelForCausalLM.from_hugging_face(tiny_hf_checkpoint(max_position_embeddings=64).path)
    with pytest.raises(ConfigError, match=r"max_seq_len=128 exceeds the model's 64 positions.*"
                                          r"lower max_seq_len \(--max-seq-len\) to 64"):
        Builder().build(plain, BuildConfig(**TINY_BUILD))
    scaled = AutoModelForCausalLM.from_hugging_face(tiny_hf_checkpoint(max_position_embeddings=64, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}).path)
    assert Builder().build(scaled, BuildConfig(**TINY_BUILD)).manifest.build_config.max_seq_len == 128
    with pytest.raises(ConfigError, match="exceeds the model's 128 positions .max_position_embeddings with rope scaling"):
        Builder().build(scaled, BuildConfig(**{**TINY_BUILD, "max_seq_len": 256}))


def test_sliding_window_shorter_than_max_seq_len_builds_and_an_empty_window_is_refused(tiny_hf_checkpoint):
    source = AutoModelForCausalLM.from_hugging_face(tiny_hf_checkpoint("MistralForCausalLM", sliding_window=64).path)
    engine = Builder().build(source, BuildConfig(**TINY_BUILD))
    assert engine.manifest.build_config.max_seq_len == 128 and engine.manifest.model_config.sliding_window == 64
    empty = AutoModelForCausalLM.from_hugging_face(tiny_hf_checkpoint("MistralForCausalLM", sliding_window=0).path)
    with pytest.raises(ConfigError, match=r"sliding_window=0 leaves a query no key.*\(>= 1\)"):
        Builder().build(empty, BuildConfig(**TINY_BUILD))


def test_an_engine_for_a_gpu_that_is_not_here_is_built_untuned(tiny_llama, tmp_path):
    """Converted and validated here; its kernel plan is left to the first load on such a GPU, and the
    weights are byte for byte those of an engine built for this machine."""
    source = AutoModelForCausalLM.from_hugging_face(tiny_llama.path)
    build = {**TINY_BUILD, "dtype": "bfloat16"}
    foreign = Builder().build(source, BuildConfig(**{**build, "target": OTHER_GPU})).save(tmp_path / "foreign")
    here = Builder().build(source, BuildConfig(**{**build, "target": "cpu"})).save(tmp_path / "here")
    manifest = EngineManifest.read(foreign)
    assert not manifest.is_kernel_plan_tuned and manifest.kernel_plan == {}
    assert manifest.target == OTHER_GPU and f"any {OTHER_GPU} GPU" in manifest.target_device_name
    assert {n: t["crc32"] for n, t in manifest.tensors.items()} == \
        {n: t["crc32"] for n, t in EngineManifest.read(here).tensors.items()}
    with pytest.raises(EngineError, match=f"built for {OTHER_GPU}"):
        load_engine(foreign)


def test_the_first_load_on_the_gpu_tunes_and_keeps_the_plan(tiny_llama, tmp_path, monkeypatch, capsys):
    from kiln.builder import tuning
    from kiln.kernels import reference_plan
    from kiln.runtime.loader import tune_at_first_load

    source = AutoModelForCausalLM.from_hugging_face(tiny_llama.path)
    engine_dir = Builder().build(source, BuildConfig(**{**TINY_BUILD, "target": OTHER_GPU})).save(tmp_path / "e")
    tuned_for, dense_shapes = [], []

    def fake_gpu_kernel_plan(config, build, dtype, tune, ops, shapes):  # what the GPU's tuning returns
        tuned_for.append((build.target, tune, tuple(ops)))
        dense_shapes.extend(shapes["dense_linear"])
        return reference_plan(ops)

    monkeypatch.setattr(tuning, "gpu_kernel_plan", fake_gpu_kernel_plan)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    tuned = tune_at_first_load(engine_dir, EngineManifest.read(engine_dir), torch.device("cpu"))
    assert tuned_for == [(OTHER_GPU, True, ("add_rms_norm", "attention", "dense_linear", "rms_norm", "rms_norm_linear",
                                            "rotary_kv_write", "silu_mul"))]
    config = source.config  # every Linear is unquantized here, and the LM head: the shapes dense_linear is timed at
    lm_head, down = (config.vocab_size, config.hidden_size), (config.hidden_size, config.intermediate_size)
    assert {lm_head, down} <= set(dense_shapes)
    assert "tuning the kernels" in capsys.readouterr().err
    saved = EngineManifest.read(engine_dir)
    assert saved == tuned and saved.is_kernel_plan_tuned and saved.target_device_name == "Fake GPU"
    assert set(saved.kernel_plan) == set(tuned_for[0][2])
    load_engine(engine_dir, device="cpu")  # the saved engine loads; a tuned plan is never tuned again
    assert len(tuned_for) == 1


# ---- per-request limits ---------------------------------------------------------------------------------

def test_requests_beyond_limits_get_error_responses_while_the_batch_finishes(tiny_llama, tiny_engine):
    engine_dir = tiny_engine(tiny_llama.path, max_input_len=16, max_seq_len=32, max_num_tokens=64)
    ok_prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
    with Executor(engine_dir) as executor:
        ids = [
            executor.enqueue_request(Request(ok_prompts[0], max_tokens=10,
                                             sampling_params=SamplingParams(temperature=0.0))),
            executor.enqueue_request(Request(list(range(3, 23)), max_tokens=4)),   # 20 tokens > max_input_len
            executor.enqueue_request(Request([3] * 10, max_tokens=30)),           # 10 + 30 > max_seq_len
            executor.enqueue_request(Request([3, 130], max_tokens=4)),            # id beyond the vocabulary
            executor.enqueue_request(Request(ok_prompts[1], max_tokens=10,
                                             sampling_params=SamplingParams(temperature=0.0))),
        ]
        final = {}
        while len(final) < len(ids):
            for response in executor.await_responses(timeout=10):
                if response.has_error() or response.result.is_final:
                    final[response.request_id] = response
    errors = {i: final[i].error_msg for i in ids[1:4]}
    assert errors[ids[1]] == ("prompt has 20 tokens but the engine's max_input_len is 16; shorten the prompt or "
                              "rebuild with a larger --max-input-len")
    assert errors[ids[2]] == ("prompt (10 tokens) + max_tokens (30) exceeds the engine's max_seq_len 32; lower "
                              "max_tokens to 22 or rebuild with a larger --max-seq-len")
    assert errors[ids[3]] == "input_token_ids must be integers in [0, 128)"

    with LLM(engine_dir, progress=False) as llm:  # each good request alone gives the same tokens
        alone = [llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[0]
                 for p in ok_prompts]
    for request_id, expected in zip((ids[0], ids[4]), alone):
        result = final[request_id].result
        assert not final[request_id].has_error()
        assert result.output_token_ids[0] == expected.outputs[0].token_ids
        assert len(result.output_token_ids[0]) == 10 and result.finish_reasons == ["length"]

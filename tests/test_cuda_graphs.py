"""CUDA graphs change no token: the Executor with decode and context graphs against the same engine run
eagerly, greedy, on the bundled stories260K model (GPU only; the CPU path never captures graphs)."""

from __future__ import annotations

import pytest
import torch

from kiln import Builder, BuildConfig, Executor, Request, RuntimeConfig, SamplingParams
from kiln.convert import AutoModelForCausalLM
from kiln.runtime.model_runner import CONTEXT_GRAPH_SEQS, graph_context_sizes
from conftest import STORIES_DIR

pytestmark = pytest.mark.gpu


def test_graph_context_sizes_stop_at_the_step_limit():
    assert graph_context_sizes(8192) == [32, 64, 128, 256, 512, 1024, 2048]
    assert graph_context_sizes(300) == [32, 64, 128, 256]


def _tokens(engine_dir, prompts, enable_cuda_graphs: bool, seen_keys: list | None = None):
    ex = Executor(engine_dir, RuntimeConfig(enable_cuda_graphs=enable_cuda_graphs))
    if seen_keys is not None:
        key_of = ex.runner._graph_key
        ex.runner._graph_key = lambda *a: seen_keys.append(key_of(*a)) or seen_keys[-1]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        # Waves that make context steps of 1-8 prompts, with and without decodes of the wave before.
        ids = []
        for wave in (prompts[:1], prompts[1:4], prompts[4:12], prompts[12:]):
            ids += [ex.enqueue_request(Request(p, sampling_params=params)) for p in wave]
        results = {}
        while len(results) < len(ids):
            for r in ex.await_responses(timeout=30.0):
                assert not r.has_error(), r.error_msg
                if r.result.is_final:
                    results[r.request_id] = r.result.output_token_ids
        return [results[i] for i in ids]
    finally:
        ex.shutdown()


def test_graphs_give_the_eager_tokens(tmp_path):
    engine_dir = tmp_path / "stories"
    config = BuildConfig(max_batch_size=16, max_input_len=256, max_seq_len=512, max_num_tokens=512)
    Builder().build(AutoModelForCausalLM.from_hugging_face(STORIES_DIR), config).save(engine_dir, progress=False)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (5, 31, 32, 33, 100, 7, 1, 2, 64, 65, 200, 13, 9, 17)]
    eager = _tokens(engine_dir, prompts, enable_cuda_graphs=False)
    keys: list = []
    graphed = _tokens(engine_dir, prompts, enable_cuda_graphs=True, seen_keys=keys)
    assert graphed == eager
    context_keys = {k for k in keys if isinstance(k, tuple)}
    assert context_keys, "no context step ran in a graph"
    assert {s for _, s in context_keys} <= set(CONTEXT_GRAPH_SEQS)

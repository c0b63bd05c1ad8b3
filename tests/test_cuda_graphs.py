"""Graphs change no token. On the GPU: the Executor with decode and context CUDA graphs against the same
engine run eagerly, greedy, on the bundled stories260K model. On the CPU (in CI): the same schedule with each
"graph" a replay of its captured forward's arguments through the Triton kernels in the interpreter (a tiny
random model: the interpreter is slow), so every launch size and padded input is the capture's, against the
unpadded eager steps."""

from __future__ import annotations

import pytest
import torch

from conftest import STORIES_DIR, TINY_BUILD
from kiln import Builder, BuildConfig, Executor, Request, RuntimeConfig, SamplingParams
from kiln.convert import AutoModelForCausalLM
from kiln.kernels import KernelOps
from kiln.layers import LayerContext, kernel_ops_of, linear_method, load_parameters
from kiln.models import create_model
from kiln.runtime.loader import LoadedEngine, load_engine
from kiln.runtime.model_runner import CONTEXT_GRAPH_SEQS, graph_batch_sizes, graph_context_sizes

LIMITS = dict(max_batch_size=8, max_input_len=256, max_seq_len=512, max_num_tokens=512)


def test_graph_context_sizes_stop_at_the_step_limit():
    assert graph_context_sizes(8192) == [32, 64, 128, 256, 512, 1024, 2048]
    assert graph_context_sizes(300) == [32, 64, 128, 256]


def _prompts(lengths: tuple[int, ...], vocab_size: int) -> list[list[int]]:
    torch.manual_seed(0)
    return [torch.randint(3, vocab_size, (n,)).tolist() for n in lengths]


def _tokens(ex: Executor, prompts: list[list[int]], max_tokens: int, seen_keys: list) -> list:
    key_of = ex.runner._graph_key
    ex.runner._graph_key = lambda *a: seen_keys.append(key_of(*a)) or seen_keys[-1]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        # Enqueued at once: with at most max_batch_size (8 on the GPU, 4 on the CPU) sequences running, steps
        # join prompts to the decodes of earlier ones, so context graphs of several sequences run.
        ids = [ex.enqueue_request(Request(p, sampling_params=params)) for p in prompts]
        results = {}
        while len(results) < len(ids):
            for r in ex.await_responses(timeout=60.0):
                assert not r.has_error(), r.error_msg
                if r.result.is_final:
                    results[r.request_id] = r.result.output_token_ids
        return [results[i] for i in ids]
    finally:
        ex.shutdown()


def _check(eager: list, graphed: list, keys: list) -> None:
    assert graphed == eager
    context_keys = {k for k in keys if isinstance(k, tuple)}
    assert context_keys, "no context step ran in a graph"
    assert {s for _, s in context_keys} <= set(CONTEXT_GRAPH_SEQS)
    assert any(isinstance(k, int) for k in keys), "no decode step ran in a graph"


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens(tmp_path):
    engine_dir = tmp_path / "stories"
    Builder().build(AutoModelForCausalLM.from_hugging_face(STORIES_DIR), BuildConfig(**LIMITS)).save(
        engine_dir, progress=False)
    prompts, keys = _prompts((5, 31, 32, 33, 100, 7, 1, 2, 64, 65, 200, 13, 9, 17), 500), []
    eager = _tokens(Executor(engine_dir, RuntimeConfig(enable_cuda_graphs=False)), prompts, 24, [])
    graphed = _tokens(Executor(engine_dir, RuntimeConfig(enable_cuda_graphs=True)), prompts, 24, keys)
    _check(eager, graphed, keys)


class _EagerReplay:
    """A captured graph's stand-in: replay runs the forward again on the arguments it was captured with,
    which write its logits into the buffer all graphs share (runner.graph_logits), first filled with NaN as
    if another graph had written there since: no step may read logits a later step's graph overwrites."""

    def __init__(self, model, args, shared_logits: torch.Tensor):
        self.model, self.args, self.shared_logits = model, args, shared_logits
        with torch.inference_mode():
            self.logits = model.forward(*args)

    def replay(self) -> None:
        self.shared_logits.fill_(float("nan"))
        self.model.forward(*self.args)


def test_padded_graph_inputs_give_the_eager_tokens(tiny_hf_checkpoint, tiny_engine):
    """The CPU counterpart: a tiny Llama in float32 with every op on its Triton kernel (interpreter)."""
    engine_dir = tiny_engine(tiny_hf_checkpoint().path, max_num_tokens=32)
    loaded = load_engine(engine_dir, progress=False)
    plan = {op: {"impl": "triton", "config": {}} for op in kernel_ops_of(loaded.model)}
    ctx = LayerContext(KernelOps(plan), linear_method("none"), torch.float32, torch.device("cpu"))
    model = create_model(loaded.model_config, ctx, TINY_BUILD["max_seq_len"])
    load_parameters(model, dict(loaded.model.named_parameters()))
    engine = LoadedEngine(engine_dir, loaded.manifest, model, loaded.tokenizer, loaded.device)
    prompts, keys = _prompts((5, 12, 3, 9, 7, 1, 6, 2), loaded.model_config.vocab_size), []
    eager = _tokens(Executor(engine), prompts, 3, [])
    ex = Executor(engine)
    runner = ex.runner
    for key in runner.graph_keys(graph_batch_sizes(TINY_BUILD["max_batch_size"]), graph_context_sizes(32)):
        replay = _EagerReplay(model, runner.stage_graph_inputs(key), runner.graph_logits)
        runner.add_graph(key, replay, replay.logits)
    _check(eager, _tokens(ex, prompts, 3, keys), keys)

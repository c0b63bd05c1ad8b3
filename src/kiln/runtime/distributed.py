"""Tensor-parallel ranks: one process per rank; rank 0 runs the Executor and the scheduler, the others
run every step's forward with it (nano-vllm's ``call(method, args)`` pattern).

Rank 0 sends each call as one message of plain data (a JSON header and raw arrays in a uint8 tensor,
never a pickle) over a gloo group of its own (CPU tensors, whatever the device); the forward's collectives
(all-reduce after row-parallel layers, the embedding's sum, the LM head's gather) and the sampled tokens
go over the device group: NCCL on GPUs (rank i on cuda:LOCAL_RANK), gloo on the CPU. At one rank none of
this exists: no process group, no collective.

Single machine: kiln starts ranks 1..N-1 itself (``start_ranks``: subprocesses on 127.0.0.1, a port the OS
picks). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), every rank runs the
same command; rank 0 runs it and the others run ``run_worker``.

Failure: a rank that exits ends the others. Rank 0 watches the ranks it started (a rank that died makes its
next step, or the idle loop, fail with a RankFailure within a fraction of a second); a collective with a
dead peer fails at once on gloo (its socket closes) and after ``DATA_TIMEOUT`` on NCCL; a worker whose
rank 0 is gone (its messages' socket closes, or its parent process changes) exits. Workers ignore SIGINT:
Ctrl-C stops rank 0, whose shutdown ends them.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kiln.config import KvCacheConfig, RuntimeConfig
from kiln.engine import EngineManifest
from kiln.errors import ConfigError, EngineError, KilnError, RankFailure
from kiln.layers import TensorParallel
from kiln.runtime.loader import LoadedEngine, load_engine, num_kv_blocks, tune_at_first_load
from kiln.runtime.model_runner import ModelRunner, make_runner

# A collective of the forward waits this long for a peer that neither answers nor dies (NCCL; on gloo a dead
# peer's closed socket fails it at once).
DATA_TIMEOUT = timedelta(minutes=2)
# Workers wait for rank 0's next message while a server idles: without a bound.
CONTROL_TIMEOUT = timedelta(days=365)
STARTUP_TIMEOUT_S = 600.0  # for kiln's own ranks to join (imports, CUDA init)
WATCH_INTERVAL_S = 0.1
EXIT_GRACE_S = 2.0  # a failed collective waits this long for a dead peer's exit status, to name it
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among the ranks: torchrun's variables, or rank 0 of ranks kiln starts."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    is_torchrun: bool

    @classmethod
    def from_environ(cls, tp_size: int) -> "LaunchEnv":
        if not all(name in os.environ for name in TORCHRUN_ENV):
            return cls(0, tp_size, 0, tp_size, False)
        env = os.environ
        world = int(env["WORLD_SIZE"])
        if world != tp_size:
            raise ConfigError(f"torchrun started {world} processes (WORLD_SIZE) for an engine built for tp_size="
                              f"{tp_size}; start exactly {tp_size} (--nnodes x --nproc-per-node)")
        return cls(int(env["RANK"]), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world)), True)


def is_torchrun_worker() -> bool:
    """This process is a rank other than 0 of a torchrun launch: it runs ``run_worker``, not the command."""
    return all(name in os.environ for name in TORCHRUN_ENV) and int(os.environ["RANK"]) != 0


def check_devices(manifest: EngineManifest, engine_dir: str | Path, local_world_size: int) -> None:
    """A GPU engine needs one GPU per rank on each machine (the CPU runs any number of ranks)."""
    if manifest.target == "cpu":
        return
    found = torch.cuda.device_count()
    if found < local_world_size:
        raise EngineError(f"{engine_dir} is built for tp_size={manifest.tp_size}: its {local_world_size} rank(s) on "
                          f"this machine need {local_world_size} GPUs, {found} visible; rebuild it with a smaller "
                          "--tp-size, run it where enough GPUs are visible (CUDA_VISIBLE_DEVICES), or spread the "
                          "ranks over machines with torchrun")


def rank_device(manifest: EngineManifest, local_rank: int, device: str | None) -> str | None:
    """Rank i runs on cuda:LOCAL_RANK (GPU engines) or the CPU; a device given must agree."""
    if manifest.target == "cpu":
        return device
    if device not in (None, "cuda"):
        raise ConfigError(f"device={device!r} (--device): the ranks of a tensor-parallel engine run on cuda:LOCAL_RANK "
                          "each; leave --device unset and choose GPUs with CUDA_VISIBLE_DEVICES")
    return f"cuda:{local_rank}"


# ---- messages: plain data in a uint8 tensor -------------------------------------------------------
def encode(method: str, args: dict[str, Any]) -> torch.Tensor:
    """[8-byte header length][JSON header][array bytes]: numpy arrays in ``args`` travel as raw bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in args.items() if isinstance(v, np.ndarray)}
    header = json.dumps({"method": method, "args": {k: v for k, v in args.items() if k not in arrays},
                         "arrays": [[k, str(a.dtype), list(a.shape)] for k, a in arrays.items()]}).encode()
    parts = [np.array([len(header)], dtype=np.int64).view(np.uint8), np.frombuffer(header, dtype=np.uint8)]
    parts += [a.reshape(-1).view(np.uint8) for a in arrays.values()]
    return torch.from_numpy(np.concatenate(parts))


def decode(payload: torch.Tensor) -> tuple[str, dict[str, Any]]:
    data = payload.numpy()
    size = int(data[:8].view(np.int64)[0])
    header = json.loads(data[8:8 + size].tobytes())
    args, offset = header["args"], 8 + size
    for name, dtype, shape in header["arrays"]:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        args[name] = data[offset:offset + nbytes].view(dtype).reshape(shape)
        offset += nbytes
    return header["method"], args


class _Channel:
    """Rank 0's calls to the other ranks over the gloo control group: a length, then the message."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.length = torch.zeros(1, dtype=torch.int64)

    def send(self, method: str, args: dict[str, Any]) -> None:
        payload = encode(method, args)
        self.length[0] = payload.numel()
        dist.broadcast(self.length, src=0, group=self.group)
        dist.broadcast(payload, src=0, group=self.group)

    def receive(self) -> tuple[str, dict[str, Any]]:
        dist.broadcast(self.length, src=0, group=self.group)
        payload = torch.empty(int(self.length[0]), dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self.group)
        return decode(payload)

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0])

    def close(self) -> None:
        """After the shutdown message, every rank meets here before any tears its groups down, so the ranks
        destroy their communicators together (NCCL's teardown has been a collective call in some versions, as
        torch's ``destroy_process_group`` notes). Gloo does not need it: 40 torchrun-style runs on 2 busy
        cores without it all passed."""
        dist.barrier(group=self.group)


def _init_groups(env: LaunchEnv, store: dist.Store | None) -> tuple[TensorParallel, _Channel]:
    """The device group (the default one: gloo for CPU tensors, and NCCL for CUDA ones where there is CUDA,
    so every rank agrees on it before knowing the engine) and the control channel's own gloo group."""
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=DATA_TIMEOUT, **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TensorParallel(env.rank, env.world_size, dist.group.WORLD), _Channel(control)


def _destroy_groups(tp: TensorParallel, channel: _Channel) -> None:
    """Destroys the process groups and drops kiln's references to them (``tp`` is the engine's too: every
    layer holds it), so that they are freed here, while the interpreter is whole. ``destroy_process_group``
    leaves gloo's worker threads running; a ProcessGroupGloo joins them when freed, and one still finishing
    a collective then frees that collective's tensors, which takes the GIL. Freed at interpreter exit instead
    (a script's engine in a global), such a thread was ended by pthread_exit inside that destructor and
    rank 0 aborted ("terminate called without an active exception") in 1 of 40 torchrun-style script runs
    on 2 busy cores. The engine's collectives fail from here on (no group) instead of reaching a dead one."""
    dist.destroy_process_group()
    tp.group = channel.group = None


def _use_device(device: str | None) -> None:
    if device is not None and device.startswith("cuda"):
        torch.cuda.set_device(device)  # NCCL's communicators are made on the current device


# ---- rank 0 ---------------------------------------------------------------------------------------
class Ranks:
    """Rank 0's side: the device group's rank (``tp``), the control channel, the ranks kiln started (none
    under torchrun) and a thread that watches them. ``ModelRunner.peers`` on rank 0."""

    def __init__(self, tp: TensorParallel, channel: _Channel, workers: list[subprocess.Popen],
                 store: dist.Store | None = None):
        self.tp, self.channel, self.workers, self.store = tp, channel, workers, store
        self.failure: RankFailure | None = None  # set when a rank stopped: serving cannot go on
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="kiln-rank-watcher", daemon=True)
        self._watcher.start()
        atexit.register(self._end_workers)  # a process that exits without shutting its engine down

    def load_engine(self, engine_dir: str | Path, config: RuntimeConfig, progress: bool) -> LoadedEngine:
        """Every rank loads its shard: rank 0 here, the others when told (the kernel plan rank 0 tuned for an
        engine built without its GPU goes with the message, so only rank 0 tunes)."""
        manifest = EngineManifest.read(engine_dir)
        device = rank_device(manifest, 0, config.device)  # rank 0 is local rank 0
        _use_device(device)
        if not manifest.is_kernel_plan_tuned and device is not None:
            manifest = tune_at_first_load(Path(engine_dir), manifest, torch.device(device))
        max_batch_size, max_num_tokens = config.resolve(manifest.build_config)
        self._call("load", {"engine_dir": str(Path(engine_dir).resolve()), "kernel_plan": manifest.kernel_plan,
                            "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens,
                            "kv_cache": dataclasses.asdict(config.kv_cache_config),
                            "enable_cuda_graphs": config.enable_cuda_graphs})
        return load_engine(engine_dir, device, progress=progress, tp=self.tp, kernel_plan=manifest.kernel_plan)

    def send_step(self, message: dict[str, Any]) -> None:
        self._call("step", message)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """Rank 0's sampled tokens to the others (the next step's PENDING inputs), over the device group."""
        dist.broadcast(tokens, src=0, group=self.tp.group)

    def min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (the KV blocks each can hold)."""
        try:
            return self.channel.min(value)
        except RuntimeError as e:
            raise self.failed(e) from None

    def _call(self, method: str, args: dict[str, Any]) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            self.channel.send(method, args)
        except RuntimeError as e:
            raise self.failed(e) from None

    def failed(self, error: BaseException) -> RankFailure:
        """The RankFailure that ``error`` (a failed step or collective) means: a rank that exited, said by its
        exit status, or the error itself; from here on every call raises it."""
        deadline = time.monotonic() + EXIT_GRACE_S  # a peer's closed socket comes before its exit status
        while self.failure is None and self.workers and time.monotonic() < deadline:
            self._poll()
            time.sleep(0.02)
        if self.failure is None:
            self.failure = RankFailure(f"a tensor-parallel step failed ({type(error).__name__}: {error}), so the "
                                       "ranks may disagree; every rank is shut down: restart kiln")
        return self.failure

    def _poll(self) -> None:
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None and self.failure is None:
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                key = f"kiln_rank{rank}_error"
                why = f": {self.store.get(key).decode()}" if self.store is not None and self.store.check([key]) else ""
                self.failure = RankFailure(f"tensor-parallel rank {rank} stopped ({how}){why}; every rank is shut "
                                           "down: restart kiln")

    def _watch(self) -> None:
        while self.failure is None:
            self._poll()
            if self._stopping.wait(WATCH_INTERVAL_S):
                return

    def _stop_watching(self) -> None:
        """Ends the watcher thread and waits until it is gone, so that no thread of kiln's outlives the ranks.
        Until it ends, its thread object holds this object and so the process groups; it may drop the last
        reference, and a ProcessGroup's destructor lets go of the GIL while it joins gloo's threads: a daemon
        thread taking the GIL back once the interpreter is finalizing is ended by pthread_exit, whose unwinding
        through that destructor aborts the process ("terminate called without an active exception",
        pytorch/pytorch#38228). Under torchrun ``stop`` has no process to wait for, so rank 0's command
        returned and began to exit while the watcher slept: rank 0 aborted in 5 of 27 runs on 2 busy cores."""
        self._stopping.set()
        self._watcher.join()

    def stop(self, send_shutdown: bool = True, timeout: float = 10.0) -> None:
        """Ends every rank: a shutdown message while they can still take one (no failure, and
        ``send_shutdown``: no other thread is sending), after which the processes kiln started have
        ``timeout`` to exit; then (at once, without a message) they are terminated, and killed if need be.
        Safe to call twice."""
        if self._stopping.is_set():
            return
        self._stop_watching()
        atexit.unregister(self._end_workers)
        is_told = self.failure is None and send_shutdown
        if is_told:
            try:
                self.channel.send("shutdown", {})
                self.channel.close()
            except RuntimeError:
                is_told = False
        deadline = time.monotonic() + (timeout if is_told else 0.0)
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _destroy_groups(self.tp, self.channel)  # also so that another engine may start its ranks in this process

    def _end_workers(self) -> None:
        """At exit, with the executor's loop perhaps still inside a step: no message, the ranks kiln started
        are terminated."""
        self._stop_watching()
        for proc in self.workers:
            proc.terminate()


def start_ranks(engine_dir: str | Path, manifest: EngineManifest) -> Ranks | None:
    """Rank 0 of an engine built for tp_size > 1: starts ranks 1..N-1 (or joins torchrun's) and opens the
    process groups. None at one rank (no process group)."""
    if manifest.tp_size == 1:
        return None
    env = LaunchEnv.from_environ(manifest.tp_size)
    check_devices(manifest, engine_dir, env.local_world_size)
    if env.is_torchrun:
        tp, channel = _init_groups(env, None)
        return Ranks(tp, channel, [])
    store = dist.TCPStore("127.0.0.1", 0, env.world_size, is_master=True, wait_for_workers=False,
                          timeout=DATA_TIMEOUT)
    workers = [_spawn(rank, env.world_size, store.port) for rank in range(1, env.world_size)]
    try:
        _wait_joined(store, workers)
        tp, channel = _init_groups(env, store)
    except BaseException:
        _kill(workers)
        raise
    return Ranks(tp, channel, workers, store)


def _spawn(rank: int, world_size: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
           "KILN_PARENT_PID": str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # as many as rank 0 uses
    return subprocess.Popen([sys.executable, "-c", "import sys; from kiln.runtime.distributed import worker_main; "
                             "sys.exit(worker_main())"], env=env, stdin=subprocess.DEVNULL)


def _wait_joined(store: dist.TCPStore, workers: list[subprocess.Popen]) -> None:
    """Waits for every started rank to reach the store, failing at once when one exits first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while store.add("kiln_ranks_joined", 0) < len(workers):
        for rank, proc in enumerate(workers, start=1):
            if proc.poll() is not None:
                raise RankFailure(f"tensor-parallel rank {rank} exited while starting (exit status {proc.returncode}); "
                                  "its error is above on stderr")
        if time.monotonic() > deadline:
            raise RankFailure(f"tensor-parallel ranks did not start within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.02)


def _kill(workers: list[subprocess.Popen]) -> None:
    for proc in workers:
        proc.kill()
        proc.wait()


# ---- ranks 1..N-1 ---------------------------------------------------------------------------------
def worker_main() -> int:
    """A rank that kiln started: joins rank 0's store, then serves its calls (``run_worker``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, whose shutdown ends this rank
    _exit_with_parent(int(os.environ["KILN_PARENT_PID"]))
    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=DATA_TIMEOUT)
    store.add("kiln_ranks_joined", 1)
    return run_worker(store)


def _exit_with_parent(parent: int) -> None:
    """Rank 0 gone (killed outright, say): this rank goes too, whatever it was waiting for."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="kiln-parent-watcher", daemon=True).start()


def run_worker(store: dist.Store | None = None) -> int:
    """Rank 1..N-1 (``store``: rank 0's, for a rank kiln started; None under torchrun): joins the process
    groups, loads its shard of the engine when rank 0 says which, then runs every step rank 0 sends until it
    says to stop (or is gone). Returns the exit status."""
    env = LaunchEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                    int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), store is None)
    try:
        tp, channel = _init_groups(env, store)
        method, args = channel.receive()
        engine_dir = args["engine_dir"]
        manifest = EngineManifest.read(engine_dir)
        check_devices(manifest, engine_dir, env.local_world_size)
        device = rank_device(manifest, env.local_rank, None)
        _use_device(device)
        engine = load_engine(engine_dir, device, progress=False, tp=tp, kernel_plan=args["kernel_plan"])
        kv = KvCacheConfig(**args["kv_cache"])
        blocks = channel.min(num_kv_blocks(engine, kv))
        runner = make_runner(engine, blocks, args["max_batch_size"], args["max_num_tokens"],
                             args["enable_cuda_graphs"])

        def receive_tokens(tokens: torch.Tensor) -> None:
            dist.broadcast(tokens, src=0, group=tp.group)

        while True:
            method, args = channel.receive()
            if method == "shutdown":
                channel.close()
                break
            runner.replay(**args, receive_tokens=receive_tokens)
    except (RuntimeError, KilnError) as e:  # rank 0 gone, a collective failed, or this rank cannot load
        print(f"kiln: tensor-parallel rank {env.rank} stopping: {e}", file=sys.stderr, flush=True)
        if store is not None:  # for rank 0's error message
            try:
                store.set(f"kiln_rank{env.rank}_error", str(e))
            except RuntimeError:
                pass  # rank 0 (which holds the store) is gone
        return 1
    _destroy_groups(tp, channel)
    return 0

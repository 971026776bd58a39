"""Sweeps on a Ray cluster: one model replica per worker, the driver the only writer of the store.

Each worker is a Ray actor (`ModelWorker`) that loads the model once (one GPU each where the cluster has GPUs, an
equal share of the CPUs otherwise) and runs shards of the planned rows through the same engine as a local sweep,
streaming each batch's rows back as it ends. The driver plans as a local sweep does, cuts the rows into shards of
near-equal cost (a sample's rows stay together: they share its prompt's pass), gives each idle worker the next
shard and writes every row it receives. A worker that dies (its process or its node) has the rows of its shard
that never arrived put back at the head of the queue, and is replaced; so the store ends complete, never doubled,
and a driver killed and restarted schedules only the missing rows, as a local sweep does.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

from vulnsteer.engine.planner import prompt_tokens_estimate
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.backends import LocalBackend, SteeringOf
from vulnsteer.experiments.side_effects import SideEffect
from vulnsteer.experiments.store import job_key, result_key
from vulnsteer.extract.activations import Activations
from vulnsteer.models import ModelInfo
from vulnsteer.records import Decoding, Job, Result

SHARDS_PER_WORKER = 4  # enough for idle workers to take over a slow or lost one's share


@dataclass(frozen=True)
class ClusterOptions:
    """`address`: "local" starts Ray on this machine; "auto" joins the cluster this machine is part of (`ray start`,
    or RAY_ADDRESS); otherwise a head node's HOST:PORT or ray://HOST:10001."""

    address: str = "auto"
    workers: int = 1

    def __post_init__(self):
        if self.workers < 1:
            raise VulnsteerError(f"--workers must be at least 1, got {self.workers}")
        if not self.address:
            raise VulnsteerError("--ray needs local, auto or a cluster address")

    @classmethod
    def from_settings(cls, table: Any, ray: str | None = None, workers: int | None = None) -> ClusterOptions | None:
        """From a config file's [cluster] table (keys `ray`, `workers`) with flags on top; None: run locally."""
        if not isinstance(table, dict):
            raise VulnsteerError("cluster in the config file must be a [cluster] table (ray = ..., workers = ...)")
        unknown = sorted(set(table) - {"ray", "workers"})
        if unknown:
            raise VulnsteerError(f"unknown key in [cluster]: {unknown[0]} (use ray, workers)")
        address, count = ray if ray is not None else table.get("ray"), workers or table.get("workers")
        if address is None:
            if count is not None:
                raise VulnsteerError("--workers needs --ray (local, auto or a cluster address)")
            return None
        if not isinstance(address, str) or not (count is None or isinstance(count, int) and count is not True):
            raise VulnsteerError("[cluster] ray must be a string and workers an integer")
        return cls(address, count or 1)


def shards(costs: Sequence[float], groups: Sequence[Hashable], n: int) -> list[list[int]]:
    """Indices of the items cut into at most `n` shards of near-equal total cost: whole groups, costliest first,
    each to the least loaded shard. Each shard keeps the items' order."""
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    loads = [0.0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    for index in sorted(members.values(), key=lambda idx: -sum(costs[i] for i in idx)):
        k = min(range(n), key=loads.__getitem__)
        out[k] += index
        loads[k] += sum(costs[i] for i in index)
    return [sorted(shard) for shard in out if shard]


def job_cost(job: Job, decoding: Decoding) -> float:
    """Tokens a row costs, roughly: its prompt (4 characters a token) and what it generates."""
    return prompt_tokens_estimate(job) + (decoding.max_new_tokens if decoding.mode == "generate" else 1)


def _worker_error(exc) -> VulnsteerError:
    """A worker's own error (a VulnsteerError, or what the engine raised) as one line."""
    cause = exc.cause
    return VulnsteerError(
        str(cause) if isinstance(cause, VulnsteerError) else f"a worker failed: {type(cause).__name__}: {cause}"
    )


@dataclass(frozen=True)
class Ready:
    info: ModelInfo
    pid: int
    node: str


class ModelWorker:
    """One model replica, run as a Ray actor: loads the model once, then serves shards on it. Each shard method is
    a generator: Ray streams what it yields to the driver as it is yielded."""

    def __init__(self, model: str, options: dict[str, str], mode: str):
        from vulnsteer.backends import load

        self.error = None
        try:  # through the backend registry, as a local run loads (the device: the GPU Ray shows the actor)
            self.backend = LocalBackend(load(model, options, mode, needs=("steers", "hidden_states")).handle)
        except Exception as exc:  # reported by ready() as one line rather than as a dead actor's traceback
            self.error = str(exc) if isinstance(exc, VulnsteerError) else f"{type(exc).__name__}: {exc}"

    def ready(self) -> Ready:
        import ray

        if self.error:
            raise VulnsteerError(f"a worker could not load the model: {self.error}")
        return Ready(self.backend.info, os.getpid(), ray.util.get_node_ip_address())

    def batch_tokens(self, max_new_tokens: int, shortest_prompt: int) -> int:
        return self.backend.batch_tokens(max_new_tokens, shortest_prompt)

    def evaluate(self, jobs: list[Job], decoding: Decoding) -> Iterator[list[Result]]:
        """The shard's rows, a batch at a time (the engine runs in a thread; its rows are yielded as they end)."""
        finished: queue.Queue = queue.Queue()
        end = object()

        def run() -> None:
            try:
                self.backend.evaluate(jobs, decoding, on_result=finished.put)
                finished.put(end)
            except BaseException as exc:  # re-raised below, in the actor's own call
                finished.put(exc)

        threading.Thread(target=run, daemon=True).start()
        while True:
            rows = [finished.get()]
            while not finished.empty():
                rows.append(finished.get())
            results = [r for r in rows if isinstance(r, Result)]
            if results:
                yield results  # rows finished before a failure are kept too
            failure = next((r for r in rows if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure
            if any(r is end for r in rows):
                return

    def activations(self, samples, prompt_id, resources, read, mode) -> Iterator[list[tuple[str, Any]]]:
        acts = self.backend.activations(samples, prompt_id, resources, read, mode)
        layers = sorted(acts.by_layer)
        yield [(s.id, [acts.by_layer[layer][i] for layer in layers]) for i, s in enumerate(acts.samples)]

    def side_effects(self, requests: list[tuple[list, dict]]) -> Iterator[list[list[SideEffect]]]:
        """One request (samples, configs), measured as one unit: a shard of one item, so a dead worker's is redone."""
        samples, configs = requests[0]
        yield [self.backend.side_effects(samples, configs)]


def _check_reachable(address: str) -> None:
    """Fail in seconds on a head node that does not answer (Ray itself retries for a minute or more)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("local", "auto") or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise VulnsteerError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from None


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise VulnsteerError("--ray needs Ray: pip install 'vulnsteer[ray]'") from exc
    return ray


class RayBackend:
    """The sweep's model work on `options.workers` Ray actors, each holding the model (see the module docstring)."""

    info: ModelInfo

    def __init__(self, options: ClusterOptions, model: str, model_options: dict[str, str], mode: str):
        ray = self.ray = _ray()
        self.started = not ray.is_initialized()
        if self.started:
            _check_reachable(options.address)
            try:
                if options.address == "local":
                    ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=options.address, log_to_driver=False)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError, by Ray release and cause
                raise VulnsteerError(
                    f"cannot reach the Ray cluster at {options.address!r}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from exc
        try:
            self._start(options, model, model_options, mode)
        except BaseException:
            self.close()
            raise

    def _start(self, options: ClusterOptions, model: str, model_options: dict[str, str], mode: str) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus:
            if options.workers > gpus:
                raise VulnsteerError(
                    f"the Ray cluster has {gpus} GPUs; --workers {options.workers} would wait for more forever"
                )
            share = {"num_gpus": 1, "num_cpus": 1}
        else:
            if options.workers > cpus:
                raise VulnsteerError(
                    f"the Ray cluster has {cpus} CPUs; --workers {options.workers} would wait for more forever"
                )
            share = {"num_cpus": cpus // options.workers}
        self.actor_class = ray.remote(max_restarts=0, **share)(ModelWorker)
        self.spawn = lambda: self.actor_class.remote(model, model_options, mode)
        self.spares = options.workers  # replacements for workers that die, before the sweep gives up
        self.workers: list = []
        self.joined = 0
        self.first: Ready | None = None
        for actor in [self.spawn() for _ in range(options.workers)]:
            self._join(actor, self._call(actor.ready.remote()))
        assert self.first is not None
        self.info = self.first.info

    def _join(self, actor, ready: Ready) -> None:
        """Add a started worker, once it has shown it holds the same weights as the first."""
        first = self.first = self.first or ready
        if (ready.info.fingerprint, ready.info.config_hash) != (first.info.fingerprint, first.info.config_hash):
            raise VulnsteerError(
                f"workers loaded different weights ({first.node} and {ready.node}): every node "
                "must have the same model files"
            )
        print(
            f"worker {self.joined}: {ready.info.model_id} on {ready.node} ({ready.info.device}), pid {ready.pid}",
            flush=True,
        )
        self.joined += 1
        self.workers.append(actor)

    def _call(self, ref):
        """`ray.get`, with a worker's failure as one line."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise _worker_error(exc) from None
        except self.ray.exceptions.RayActorError as exc:
            raise VulnsteerError(f"a worker died while starting: {str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        for actor in getattr(self, "workers", []):
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()

    def local_model(self) -> None:
        return None  # the weights live on the workers

    def batch_tokens(self, max_new_tokens: int, shortest_prompt: int) -> int:
        """The first worker's budget serves all (a cluster's GPUs are alike, or the smallest should be first)."""
        return self._call(self.workers[0].batch_tokens.remote(max_new_tokens, shortest_prompt))

    def evaluate(self, jobs, decoding, progress=None, on_result=None, done=frozenset()) -> None:
        """The rows not `done`, in shards over the workers (a resumed row's batch companions may differ here)."""
        jobs = [job for k, job in enumerate(jobs) if k not in done]
        cut = shards(
            [job_cost(j, decoding) for j in jobs], [j.sample.id for j in jobs], len(self.workers) * SHARDS_PER_WORKER
        )

        def received(results: list[Result]) -> None:
            for result in results:
                if on_result:
                    on_result(result)
            if progress:
                progress(len(results))

        self._map(
            "evaluate",
            [[jobs[i] for i in shard] for shard in cut],
            lambda job: job_key(job, decoding.mode),
            result_key,
            received,
            decoding,
        )

    def activations(self, samples, prompt_id, resources, read, mode, progress=None) -> Activations:
        import torch

        rows: dict[str, list] = {}

        def received(values: list[tuple[str, Any]]) -> None:
            rows.update(values)
            if progress:
                progress(len(values))

        cut = shards([len(s.code) for s in samples], [s.id for s in samples], len(self.workers) * SHARDS_PER_WORKER)
        self._map(
            "activations",
            [[samples[i] for i in shard] for shard in cut],
            lambda s: s.id,
            lambda value: value[0],
            received,
            prompt_id,
            resources,
            read,
            mode,
        )
        by_layer = {layer: torch.stack([rows[s.id][layer] for s in samples]) for layer in range(self.info.num_layers)}
        return Activations(list(samples), by_layer, read, prompt_id, mode)

    def side_effects(self, samples, configs: dict[str, SteeringOf], progress=None) -> list[SideEffect]:
        effects: list[list[SideEffect]] = []
        self._map("side_effects", [[(list(samples), configs)]], lambda _: "all", lambda _: "all", effects.extend)
        if progress:
            progress(len(samples))
        return effects[0]

    def _map(
        self,
        method: str,
        work: list[list],
        key: Callable[[Any], str],
        value_key: Callable[[Any], str],
        received: Callable[[list], None],
        *args,
    ) -> None:
        """Run every shard of `work` on the workers, each idle worker taking the next; `received` gets each
        streamed list of values. A dead worker's unfinished items go back to the head of the queue."""
        ray = self.ray
        todo: deque[list] = deque(shard for shard in work if shard)
        idle = list(self.workers)
        running: dict[Any, tuple[Any, list, set[str]]] = {}  # stream -> (worker, shard, keys received)
        starting: dict[Any, Any] = {}  # ready() ref -> replacement worker
        while todo or running:
            while todo and idle:
                worker, shard = idle.pop(), todo.popleft()
                stream = getattr(worker, method).options(num_returns="streaming").remote(shard, *args)
                running[stream] = (worker, shard, set())
            if not running and not starting:
                raise VulnsteerError("every Ray worker died; the rows finished so far are saved, rerun to continue")
            [done], _ = ray.wait([*running, *starting], num_returns=1)
            if done in starting:
                replacement = starting.pop(done)
                self._join(replacement, self._call(done))
                idle.append(replacement)
                continue
            worker, shard, got = running[done]
            try:
                values = ray.get(next(done))
            except StopIteration:
                del running[done]
                idle.append(worker)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise _worker_error(exc) from None
            except ray.exceptions.RayActorError:
                del running[done]
                self.workers.remove(worker)
                left = [item for item in shard if key(item) not in got]
                print(f"a worker died; {len(left)} of its shard's items go back to the queue", flush=True)
                if left:
                    todo.appendleft(left)
                if self.spares:
                    self.spares -= 1
                    replacement = self.spawn()
                    starting[replacement.ready.remote()] = replacement
                continue
            got.update(value_key(v) for v in values)
            received(values)
        for ready, replacement in starting.items():  # the work ended first: restore the pool for the next call
            self._join(replacement, self._call(ready))

"""Executors run tasks (bench.run.work.Work) and hand what they yield back to the driver, one
event at a time: `(task name, message)`, then `(task name, DONE)`, or `(task name,
Crashed(...))` when the worker died (the driver retries), or `(task name, Raised(...))`
when the task itself failed (the driver stops with its error).

- `Inline`: this process, one task at a time (the default on a CPU);
- `Processes`: one worker process per slot, each pinned to one GPU when there are GPUs
  (`--workers N`; default: one per visible GPU);
- `RayExecutor`: Ray tasks on a local Ray bound to 127.0.0.1, or on the cluster at
  `--ray-address`; each task asks for the suite's resources (bench.run.plan.Resources).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from bench.core.environment import tolerant_streams
from bench.run.plan import Resources
from bench.run.reaper import Reaper, descendants
from bench.run.work import Work, execute
from models import UserError

log = logging.getLogger(__name__)
DONE = "done"
POLL_SECONDS = 0.5
CONNECT_SECONDS = 10.0  # for a cluster's address to answer


@dataclass(frozen=True)
class Crashed:
    reason: str  # the worker process or node died: the task may be retried


@dataclass(frozen=True)
class Raised:
    error: BaseException  # the task raised: a real failure, not retried


class Executor(Protocol):
    slots: int  # tasks that may run at once

    def submit(self, name: str, work: Work) -> None: ...

    def next_event(self) -> tuple[str, object]: ...

    def close(self) -> None: ...


class Inline:
    """Tasks run here, in submission order; their exceptions propagate as they are."""

    slots = 1

    def __init__(self) -> None:
        self._running: deque[tuple[str, Iterator]] = deque()

    def submit(self, name: str, work: Work) -> None:
        self._running.append((name, execute(work)))

    def next_event(self) -> tuple[str, object]:
        name, messages = self._running[0]
        try:
            return name, next(messages)
        except StopIteration:
            self._running.popleft()
            return name, DONE

    def close(self) -> None:
        self._running.clear()


def _worker(inbox: Any, outbox: Any, environment: dict[str, str]) -> None:
    """A worker process: runs the tasks sent to it, streaming every message back."""
    os.environ.update(environment)
    tolerant_streams()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    while (item := inbox.get()) is not None:
        name, work = item
        try:
            for message in execute(work):
                outbox.put((name, message))
            outbox.put((name, DONE))
        except BaseException as err:  # handed to the driver, which decides
            outbox.put((name, Raised(err)))


class Processes:
    """`slots` worker processes on this machine (spawned: no CUDA state is inherited);
    with GPUs, worker i sees only GPU i % count."""

    def __init__(self, slots: int, gpus: int) -> None:
        self.slots, self._gpus = slots, gpus
        self._context = multiprocessing.get_context("spawn")
        self._outbox = self._context.Queue()
        self._workers: list = [None] * slots
        self._busy: dict[int, str] = {}  # worker index -> task name
        self._reaper = Reaper({})  # the workers die with the driver, even a SIGKILLed one
        for index in range(slots):
            self._start(index)

    def _start(self, index: int) -> None:
        environment = {"CUDA_VISIBLE_DEVICES": str(index % self._gpus)} if self._gpus else {}
        inbox = self._context.Queue()
        process = self._context.Process(target=_worker, args=(inbox, self._outbox, environment), daemon=True)
        process.start()
        self._workers[index] = (process, inbox)
        self._reaper.add({pid: start for pid, start in descendants().items() if pid == process.pid})

    def submit(self, name: str, work: Work) -> None:
        index = next(i for i in range(self.slots) if i not in self._busy)
        self._busy[index] = name
        self._workers[index][1].put((name, work))

    def next_event(self) -> tuple[str, object]:
        while True:
            try:
                name, message = self._outbox.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for index, name in list(self._busy.items()):
                    process = self._workers[index][0]
                    if not process.is_alive():  # killed: its task is lost, a fresh worker takes its slot
                        del self._busy[index]
                        self._start(index)
                        return name, Crashed(
                            f"worker process {process.pid} exited with code {process.exitcode}"
                        )
                continue
            if isinstance(message, str | Raised):  # DONE or a failure: the worker is free
                self._busy = {i: n for i, n in self._busy.items() if n != name}
            return name, message

    def pid(self, name: str) -> int | None:
        """The process id running task `name` (tests kill it)."""
        index = next((i for i, n in self._busy.items() if n == name), None)
        return None if index is None else self._workers[index][0].pid

    def close(self) -> None:
        for process, inbox in self._workers:
            if process.is_alive():
                inbox.put(None)
        for process, _ in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self._reaper.close()


class RayExecutor:
    """Ray tasks (streaming generators, so each finished piece reaches the driver when
    done). Ray's own retries are off: a crashed task comes back as Crashed and the
    driver resubmits it with what is still missing."""

    def __init__(self, address: str | None, workers: int | None, resources: Resources, num_gpus: int) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install -e '.[cluster]'") from None
        self._ray, self._reaper = ray, None
        if address is None:  # a private Ray on this machine, reachable from localhost only
            slots = workers or (max(1, num_gpus) if resources.gpus else 1)
            before = descendants()
            with _loopback(ray):
                ray.init(
                    num_cpus=slots * max(1, resources.cpus),
                    num_gpus=num_gpus,
                    include_dashboard=False,  # its head still runs, with no UI, on 127.0.0.1
                    _node_ip_address="127.0.0.1",
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            # what this init started dies with the driver, even a SIGKILLed one
            self._reaper = Reaper({p: t for p, t in descendants().items() if p not in before})
        else:
            _join(ray, address)
        self.slots = workers or _cluster_slots(ray.cluster_resources(), resources)
        options = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
        if resources.memory_gib and address is not None:  # a local Ray has no memory to share out
            options["memory"] = int(resources.memory_gib * 2**30)
        self._task = ray.remote(_ray_task).options(**options)
        self._running: dict = {}  # generator -> task name

    def submit(self, name: str, work: Work) -> None:
        self._running[self._task.remote(work)] = name

    def next_event(self) -> tuple[str, object]:
        ray = self._ray
        while True:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=POLL_SECONDS)
            if ready:
                break
        generator = ready[0]
        name = self._running[generator]
        try:
            message = ray.get(next(generator))
        except StopIteration:
            del self._running[generator]
            return name, DONE
        except ray.exceptions.RayTaskError as err:  # the task raised: its own exception
            del self._running[generator]
            return name, Raised(err.cause if isinstance(err.cause, BaseException) else err)
        except ray.exceptions.RayError as err:  # a worker or node died
            del self._running[generator]
            return name, Crashed(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return name, message

    def close(self) -> None:
        self._ray.shutdown()
        if self._reaper is not None:
            self._reaper.close()


@contextlib.contextmanager
def _loopback(ray: Any) -> Iterator[None]:
    """Ray's local-only mode while a private Ray starts: its node address and every port
    it opens are on 127.0.0.1. Otherwise Ray replaces the address asked for by the
    machine's outward one and binds GCS, raylet and workers to all interfaces. The switch
    is Ray's own (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS and Windows default):
    the processes started now inherit it, and it is undone after."""
    constants = ray._private.ray_constants
    variable, saved = constants.ENABLE_RAY_CLUSTERS_ENV_VAR, constants.ENABLE_RAY_CLUSTER
    before = os.environ.get(variable)
    os.environ[variable], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


def _join(ray: Any, address: str) -> None:
    """Join the cluster at `address` in bounded time: one error line when nothing listens
    there (Ray itself would retry for minutes) or Ray refuses."""
    where = address.removeprefix("ray://")
    if address != "auto":
        host, _, port = where.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
        except OSError as err:
            raise UserError(
                f"cannot reach a Ray cluster at {address} ({err.strerror or err}) within {CONNECT_SECONDS:g} s: "
                "start it (`ray start --head`) or check --ray-address"
            ) from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except Exception as err:  # Ray raises ConnectionError, ValueError, RuntimeError ... for one cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot join the Ray cluster at {address} ({first}): check --ray-address") from None


def _ray_task(work: Work) -> Iterator[object]:
    tolerant_streams()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    yield from execute(work)


def _cluster_slots(total: dict, resources: Resources) -> int:
    """How many tasks of `resources` the cluster runs at once."""
    limits = [total.get("CPU", 1) // max(1, resources.cpus)]
    if resources.gpus:
        limits.append(total.get("GPU", 0) // resources.gpus)
    return max(1, int(min(limits)))


def make_executor(
    kind: str, workers: int | None, address: str | None, resources: Resources, device: str
) -> Executor:
    """The executor the options ask for; `local` with one slot is Inline."""
    gpus = _visible_gpus() if device.startswith("cuda") else 0
    if kind == "ray":
        return RayExecutor(address, workers, resources, gpus)
    slots = workers or max(1, gpus)
    if slots == 1:
        return Inline()
    return Processes(slots, gpus if device == "cuda" else 0)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()

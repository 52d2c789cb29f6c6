"""Worker processes that call reward functions with a per-call timeout: a call past its deadline
has its worker's whole process group killed and a fresh worker takes its place, so a hanging or
crashing user reward costs that call, never the run.

rewards/runner.py submits calls and turns the outcomes into rewards, None and metrics. Workers are
spawned (not forked): the trainer holds threads (torch, vLLM) that fork would copy mid-lock.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

OK, ERROR, TIMEOUT = "ok", "error", "timeout"
READY = "ready"
STARTUP_TIMEOUT_S = 120.0


@dataclass
class Call:
    """One reward call: `fn_ref` is a reward name for registry.load_reward, or a picklable function."""

    fn_ref: object
    kwargs: dict
    timeout_s: float


@dataclass
class Outcome:
    status: str  # OK, ERROR or TIMEOUT
    value: object = None  # the function's return value when OK
    error: str = ""


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: the kernel SIGKILLs this worker if the trainer dies, hung or not.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _worker_main(conn) -> None:
    os.setpgrp()  # own process group: a timeout kill also takes any children the reward started
    _die_with_parent()
    from .registry import available_rewards, load_reward

    available_rewards()  # loads the built-ins (math-verify, sympy) before any deadline runs
    conn.send(READY)  # deadlines start after start-up, so a slow import is not a reward timeout
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        try:
            fn = load_reward(call.fn_ref)
            result = Outcome(OK, fn(**call.kwargs))
        except BaseException as e:  # noqa: BLE001 - a reward's failure is data for the runner
            result = Outcome(ERROR, error=f"{type(e).__name__}: {e}", value=traceback.format_exc(limit=5))
        try:
            conn.send(result)
        except Exception as e:  # an unpicklable return value
            conn.send(Outcome(ERROR, error=f"reward returned an unpicklable value: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="r1pipe-reward-worker")
        self.process.start()
        child.close()
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT_S) and self.conn.recv() == READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:g} s (exit code {self.process.exitcode})")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.kill()
        except Exception:
            pass
        self.process.join(timeout=5)
        self.conn.close()


class RewardPool:
    """`size` spawned workers, started on first use. `run(calls)` returns one Outcome per call, in
    order; calls run in parallel across workers, each against its own deadline."""

    def __init__(self, size: int = 1, start_method: str = "spawn"):
        if size < 1:
            raise ValueError(f"RewardPool size={size}; expected >= 1")
        self.size = size
        self._ctx = mp.get_context(start_method)
        self._idle: list[_Worker] = []
        self._started = 0

    def _take_worker(self) -> _Worker | None:
        if self._idle:
            return self._idle.pop()
        if self._started < self.size:
            self._started += 1
            return _Worker(self._ctx)
        return None

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        self._started -= 1

    def run(self, calls: list[Call]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(calls)
        pending = list(range(len(calls)))
        busy: dict = {}  # conn -> (worker, call index, deadline)
        while pending or busy:
            while pending:
                try:
                    worker = self._take_worker()
                except RuntimeError as e:  # workers cannot start: every waiting call fails, the run goes on
                    for i in pending:
                        outcomes[i] = Outcome(ERROR, error=str(e))
                    pending = []
                    break
                if worker is None:
                    break
                i = pending.pop(0)
                try:
                    worker.conn.send(calls[i])
                except Exception as e:  # unpicklable arguments: the call's fault, not the worker's
                    outcomes[i] = Outcome(ERROR, error=f"cannot send reward arguments to a worker: {type(e).__name__}: {e}")
                    self._idle.append(worker)
                    continue
                busy[worker.conn] = (worker, i, time.monotonic() + calls[i].timeout_s)
            if not busy:
                continue
            next_deadline = min(d for _, _, d in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                worker, i, _ = busy.pop(conn)
                try:
                    outcomes[i] = conn.recv()
                    self._idle.append(worker)
                except (EOFError, OSError):
                    outcomes[i] = Outcome(ERROR, error=f"reward worker died (exit code {worker.process.exitcode})")
                    self._retire(worker)
            now = time.monotonic()
            for conn, (worker, i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(conn)
                    outcomes[i] = Outcome(TIMEOUT, error=f"timed out after {calls[i].timeout_s:g} s")
                    self._retire(worker)
        return outcomes

    def close(self) -> None:
        for worker in self._idle:
            try:
                worker.conn.send(None)
            except Exception:
                pass
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()
        self._idle.clear()
        self._started = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Rollout engine served by a separate `vllm serve` process (the multi-GPU path): the same
`generate` / `sync_weights` as the colocated `VLLMRolloutEngine`, over HTTP.

Generation: one seeded `POST /v1/completions` per (prompt, sample), token-id prompt, `logprobs=0` (the
sampled token's logprob) and `return_token_ids` (the completion ids exactly, no detokenize/retokenize),
sent concurrently. Weight push: `weight_sync` plans the buckets here, each bucket is written to a
safetensors file in shared memory and loaded by the server's worker (`server_worker.WeightLoader`,
reached through the dev-mode `POST /collective_rpc`), then `POST /reset_prefix_cache`. The server must
therefore run on this host with VLLM_SERVER_DEV_MODE=1 and the extension; a server this engine starts
itself has both.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import torch

from r1pipe.rollout import weight_sync
from r1pipe.rollout.vllm_engine import SeededRequestEngine, SyncStats, engine_settings

EXTENSION = "r1pipe.rollout.server_worker.WeightLoader"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(settings: dict, port: int) -> list[str]:
    """`vllm serve` (through `server_worker.main`) with the colocated engine's settings as flags."""
    cmd = [sys.executable, "-m", "r1pipe.rollout.server_worker", "serve", settings["model"],
           "--host", "127.0.0.1", "--port", str(port), "--worker-extension-cls", EXTENSION]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if key == "model" or value is False or value is None:
            continue
        cmd += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return cmd


class VLLMServerEngine(SeededRequestEngine):
    """Rollouts from a vLLM server: `server_url` connects to a running one (started as README
    "Multi-GPU and multi-node" says), else `vllm serve model_dir` is started here (stopped on `close`
    or at exit; its output goes to `log_file`). `model_dir`: the checkpoint the server loaded (its keys
    are what a sync must cover). `settings`: `vllm_engine.engine_settings`, for a server started here.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        server_url: str | None = None,
        bucket_bytes: int = 256 << 20,
        sync_dir: str | Path = "/dev/shm",
        start_timeout_s: float = 600.0,
        max_concurrency: int = 64,
        log_file: str | Path | None = None,
        **settings,
    ):
        import httpx

        self.model_dir = Path(model_dir)
        self.bucket_bytes = bucket_bytes
        self.sync_dir = Path(sync_dir)
        self.max_concurrency = max_concurrency
        self.process = None
        self._http = httpx.Client(timeout=httpx.Timeout(None, connect=10.0))
        config = json.loads((self.model_dir / "config.json").read_text())
        self._plan = weight_sync.SyncPlan(self.model_dir, SimpleNamespace(**config))
        t0 = time.perf_counter()
        if server_url is None:
            settings = engine_settings(self.model_dir, **settings)
            self._start(settings, start_timeout_s, log_file)
        else:
            self.url = _checked_url(server_url)
            try:
                self._http.get(f"{self.url}/health", timeout=10.0).raise_for_status()
            except httpx.HTTPError as e:
                raise ConnectionError(f"rollout.server_url={server_url!r}: no healthy vLLM server ({e})") from e
        self.model_name = self._http.get(f"{self.url}/v1/models").json()["data"][0]["id"]
        self.start_seconds = time.perf_counter() - t0

    def _start(self, settings: dict, timeout_s: float, log_file) -> None:
        import httpx

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        if log_file is None:
            fd, log_file = tempfile.mkstemp(prefix="r1pipe-vllm-serve-", suffix=".log")
            os.close(fd)
        self.log_file = Path(log_file)
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        # The API server always runs the engine core in a process of its own; 0 (what the colocated
        # engine runs with) keeps the worker in that process on the CPU too: one vLLM import fewer.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(serve_command(settings, port), stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        atexit.register(self.close)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                self.process = None
                raise RuntimeError(f"vllm serve exited during start; log {self.log_file}:\n{tail}")
            try:
                if self._http.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s; log {self.log_file}")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the server this engine started (its whole process group); a connected one is left running."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _complete(self, prompts: list[list[int]], seeds: list[int], sampling: dict) -> list[tuple[list[int], list[float], str]]:
        common = dict(model=self.model_name, n=1, logprobs=0, return_token_ids=True,
                      **{**sampling, "stop_token_ids": sampling["stop_token_ids"] or []})

        def one(k: int):
            c = self._post("/v1/completions", {**common, "prompt": prompts[k], "seed": seeds[k]})["choices"][0]
            if c["finish_reason"] not in ("stop", "length"):
                raise RuntimeError(f"vLLM server request {k} ended with {c['finish_reason']!r}")
            return list(c["token_ids"]), [float(x) for x in c["logprobs"]["token_logprobs"]], c["finish_reason"]

        with ThreadPoolExecutor(max(1, min(self.max_concurrency, len(seeds)))) as pool:
            return list(pool.map(one, range(len(seeds))))

    def _post(self, route: str, body: dict | None = None):
        r = self._http.post(f"{self.url}{route}", json=body)
        if r.status_code != 200:
            # the weight-sync routes exist only on a dev-mode server
            dev_route = route in ("/collective_rpc", "/reset_prefix_cache")
            hint = " (is the server in dev mode, VLLM_SERVER_DEV_MODE=1?)" if r.status_code == 404 and dev_route else ""
            raise RuntimeError(f"vLLM server {self.url}: {route} answered {r.status_code}{hint}: {r.text[:500]}")
        return r.json() if r.content else None

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """As `VLLMRolloutEngine.sync_weights`; each bucket goes through a file in `sync_dir`."""
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        buckets = self._plan.buckets(named_tensors, self.bucket_bytes)
        n = nbytes = 0
        for b, bucket in enumerate(buckets):
            path = self.sync_dir / f"r1pipe-sync-{os.getpid()}-{uuid.uuid4().hex[:8]}-{b}.safetensors"
            try:
                save_file({k: t.contiguous().cpu() for k, t in bucket}, str(path))
                results = self._post("/collective_rpc", {"method": "load_weight_file", "args": [str(path)]})
                n += int(results["results"][0])
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            finally:
                path.unlink(missing_ok=True)
        self._post("/reset_prefix_cache")  # cached KV blocks hold activations of the old weights
        return SyncStats(seconds=time.perf_counter() - t0, tensors=n, buckets=len(buckets), bytes=nbytes)


def _checked_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"rollout.server_url={url!r}: expected http://HOST:PORT of a `vllm serve` process")
    return url.rstrip("/")

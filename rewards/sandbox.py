"""The code sandbox: run untrusted, model-written Python on a list of stdin inputs and return what it
printed, without letting it reach the network, the host's files, secrets or other processes.

Layers (each enough for some attacks, together for all the tests in tests/rewards/test_sandbox.py):
rlimits set before exec (CPU, address space, file size, process count, no core files); a scrubbed
environment; new net/pid/mount namespaces through util-linux `unshare` where available (no network
at all, one kill ends every process, a read-only filesystem with private tmpfs scratch space); a
throwaway uid so RLIMIT_NPROC applies and nothing of root's is reachable; a wall-time kill of the
whole process group. Without namespaces, the program's interpreter refuses sockets instead (weaker:
C code can bypass it). rewards/sandbox_harness.py is the part that runs inside; rewards/code.py
uses this module to score completions against test cases.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HARNESS = Path(__file__).with_name("sandbox_harness.py")
NAMESPACE_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc")
# Each run gets its own uid from this range (no passwd entry needed): RLIMIT_NPROC is counted per
# uid, and cleanup can kill "every process of this uid" without touching anything else.
SANDBOX_UIDS = (3_000_000, 4_000_000)
ISOLATIONS = ("namespaces", "user-namespaces", "rlimits")


@dataclass(frozen=True)
class SandboxLimits:
    """wall_s bounds the whole run (all inputs); case_wall_s one program run (also its CPU seconds,
    rounded up). memory_mb is RLIMIT_AS per process, file_mb RLIMIT_FSIZE, nproc RLIMIT_NPROC."""

    wall_s: float = 20.0
    case_wall_s: float = 4.0
    memory_mb: int = 1024
    file_mb: int = 16
    nproc: int = 32
    nofile: int = 64
    tmpfs_mb: int = 64
    max_output_bytes: int = 1 << 20


@dataclass
class CaseResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class SandboxResult:
    """cases: one per stdin input, in order (none when the run was killed). error: why the run as
    a whole failed (wall-time kill, harness crash), else None."""

    cases: list = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False  # the whole run hit wall_s
    isolation: str = ""
    uid: int | None = None
    wall_s: float = 0.0


def _world_traversable(path: Path) -> bool:
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """An interpreter the throwaway uid can run: ours when it and its stdlib are world-accessible,
    else the system's (the untrusted program needs only the standard library)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
    if os.geteuid() != 0:
        return sys.executable
    for c in candidates:
        if not c:
            continue
        real = Path(c).resolve()
        lib = real.parent.parent / "lib"
        if _world_traversable(real) and _world_traversable(lib):
            return str(real)
    raise RuntimeError(f"no Python interpreter readable by an unprivileged uid among {candidates}; the sandbox cannot run")


def _preexec(limits: SandboxLimits):
    # The harness lives for the whole run; each program gets case CPU seconds from the harness.
    cpu_s = int(math.ceil(limits.wall_s)) + 1
    memory = limits.memory_mb << 20
    fsize = limits.file_mb << 20

    def apply():  # runs in the child between fork and exec: plain syscalls only
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc, limits.nproc))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        # A zombie is already dead (its parent has yet to reap it); only live processes matter.
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def kill_uid(uid: int, patience_s: float = 5.0) -> int:
    """SIGKILL every process of a sandbox uid until none is left; returns how many were seen."""
    if not SANDBOX_UIDS[0] <= uid < SANDBOX_UIDS[1]:
        raise ValueError(f"refusing to kill processes of uid {uid}: not a sandbox uid")
    seen, deadline = set(), time.monotonic() + patience_s
    while time.monotonic() < deadline:
        pids = _pids_of_uid(uid)
        if not pids:
            break
        seen.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    return len(seen)


def _launch(isolation: str, code: str, stdins, limits: SandboxLimits, python: str):
    """Start the harness; returns (process, job bytes, uid, host workdir or None)."""
    root = os.geteuid() == 0
    uid = secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) + SANDBOX_UIDS[0] if root else None
    if isolation == "user-namespaces":
        uid = None  # only our own uid is mapped in the namespace; RLIMIT_NPROC applies to it as is
    workdir = None
    argv = [python, "-I", "-S", "-c", HARNESS.read_text()]
    if isolation == "namespaces":
        argv = ["unshare", *NAMESPACE_FLAGS, "--", *argv]
    elif isolation == "user-namespaces":
        argv = ["unshare", "--user", "--map-root-user", *NAMESPACE_FLAGS, "--", *argv]
    else:
        workdir = tempfile.mkdtemp(prefix="r1pipe-sandbox-")
    nonce = secrets.token_hex(16)
    job = {
        "code": code, "stdins": list(stdins), "python": python, "nonce": nonce, "uid": uid,
        "namespaces": isolation != "rlimits", "block_sockets": isolation == "rlimits",
        "case_timeout_s": limits.case_wall_s, "case_cpu_s": int(math.ceil(limits.case_wall_s)) + 1,
        "max_output": limits.max_output_bytes, "tmpfs_mb": limits.tmpfs_mb,
    }
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=workdir or "/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        preexec_fn=_preexec(limits), start_new_session=True, close_fds=True,
    )
    return proc, json.dumps(job).encode(), nonce, uid, workdir


def run_in_sandbox(code: str, stdins=("",), limits: SandboxLimits = SandboxLimits(), isolation: str | None = None) -> SandboxResult:
    """Run `code` as a Python program once per stdin text. Never raises for anything the program
    does; SandboxResult.error says when the run as a whole was cut short."""
    isolation = isolation or isolation_mode()
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r}; expected one of {ISOLATIONS}")
    start = time.monotonic()
    proc, job, nonce, uid, workdir = _launch(isolation, code, stdins, limits, sandbox_python())
    result = SandboxResult(isolation=isolation, uid=uid)
    try:
        out, err = proc.communicate(job, timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)  # unshare dies, --kill-child takes the namespace's init, the kernel the rest
        out, err = proc.communicate()
        result.error, result.timed_out = f"wall-time limit of {limits.wall_s:g} s exceeded", True
    finally:
        _kill_group(proc.pid)
        if uid is not None:
            kill_uid(uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result.wall_s = time.monotonic() - start
    report = [line for line in out.decode(errors="replace").splitlines() if line.startswith(nonce)]
    if report:
        result.cases = [CaseResult(**c) for c in json.loads(report[-1][len(nonce):])]
    elif result.error is None:
        tail = err.decode(errors="replace")[-500:]
        result.error = f"sandbox harness exited with {proc.returncode} without a report: {tail}"
    return result


@lru_cache(maxsize=1)
def isolation_mode() -> str:
    """The strongest isolation that works here, found by running a trivial program through each."""
    if shutil.which("unshare"):
        modes = ["namespaces"] if os.geteuid() == 0 else ["user-namespaces"]
        for mode in modes:
            try:
                res = run_in_sandbox("print(6 * 7)", limits=SandboxLimits(wall_s=30), isolation=mode)
            except (OSError, RuntimeError):
                continue
            if res.cases and res.cases[0].ok and res.cases[0].stdout.strip() == "42":
                return mode
    return "rlimits"

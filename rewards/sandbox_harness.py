"""Runs inside the code sandbox (stdlib only; started as `python -I -S -c <this file>`): finishes the
isolation from the inside, runs the untrusted program once per test input as a throwaway uid,
reports one JSON line.

Neighbour: rewards/sandbox.py starts it (inside new mount/pid/net namespaces when it can), sends the
job on stdin and reads the report, which starts with a nonce the untrusted program never sees.
"""

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
# World-writable places get a private, size-capped tmpfs; everything else becomes read-only.
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
# In the fallback (no namespaces) the program's own interpreter refuses sockets first.
SOCKET_BLOCK = """
import socket as _s, _socket as _rs
def _refuse(*a, **k):
    raise OSError(101, "network access is disabled in the r1pipe sandbox")
class _NoSocket(_s.socket):
    def __init__(self, *a, **k):
        _refuse()
_s.socket = _rs.socket = _NoSocket
_s.create_connection = _s.socketpair = _s.fromfd = _rs.socketpair = _refuse
del _s, _rs
"""
RUN_SOLUTION = "import runpy, sys; sys.argv = ['solution.py']; runpy.run_path('solution.py', run_name='__main__')"

libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def private_filesystem(tmpfs_mb):
    """Inside a fresh mount namespace only: make it private (so nothing reaches the host's mount
    table), remount everything read-only, put private tmpfs on the world-writable dirs."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # raises rather than touch a shared mount
    with open("/proc/self/mountinfo") as f:
        points = sorted({line.split()[4].replace("\\040", " ") for line in f})
    for point in points:
        if point == "/proc" or point.startswith("/proc/"):
            continue
        try:
            keep = os.statvfs(point).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            pass  # some pseudo filesystems refuse; the uid drop still guards them
    for d in SCRATCH_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")


def no_new_privileges():
    # Inherited by every program started from here: setuid binaries (su, mount) and file
    # capabilities can no longer raise privileges. Dropping our own uid stays possible.
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _reap():
    """Collect killed orphans: as PID 1 of the namespace they become our zombies, and zombies still
    count against RLIMIT_NPROC."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_case(python, stdin_text, timeout_s, cpu_s, max_output, block_sockets, workdir, iodir, env, uid):
    argv = [python, "-I", "-c", (SOCKET_BLOCK if block_sockets else "") + RUN_SOLUTION]
    out_path, err_path = os.path.join(iodir, "stdout"), os.path.join(iodir, "stderr")
    start = time.monotonic()
    # Output goes to files, so RLIMIT_FSIZE caps it instead of this process's memory.
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # The program alone runs as the throwaway uid: it cannot signal or trace this harness.
        as_uid = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        cpu_limit = lambda: resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # noqa: E731
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                start_new_session=True, preexec_fn=cpu_limit, **as_uid)
        timed_out = False
        try:
            proc.communicate(stdin_text.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except (BrokenPipeError, OSError):
            pass  # the program exited without reading its input
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's children too
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    wall = time.monotonic() - start
    _reap()
    with open(out_path, "rb") as f:
        stdout = f.read(max_output).decode(errors="replace")
    with open(err_path, "rb") as f:
        stderr = f.read(max_output).decode(errors="replace")
    for p in (out_path, err_path):
        os.unlink(p)
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "timed_out": timed_out, "wall_s": wall}


def main():
    job = json.loads(sys.stdin.read())
    uid = job["uid"] if os.getuid() == 0 else None
    if job["namespaces"]:
        private_filesystem(job["tmpfs_mb"])
        base = "/tmp"  # the private tmpfs
    else:
        base = os.getcwd()  # a fresh host temp dir
        os.chmod(base, 0o711)  # the program's uid may pass through to work/, not list it
    no_new_privileges()
    workdir, iodir = os.path.join(base, "work"), os.path.join(base, "io")
    os.mkdir(workdir, 0o700)
    os.mkdir(iodir, 0o700)  # the harness's own: the program's output files, out of its reach
    with open(os.path.join(workdir, "solution.py"), "w") as f:
        f.write(job["code"])
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(os.path.join(workdir, "solution.py"), uid, uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    results = [
        run_case(job["python"], stdin_text, job["case_timeout_s"], job["case_cpu_s"], job["max_output"],
                 job["block_sockets"], workdir, iodir, env, uid)
        for stdin_text in job["stdins"]
    ]
    sys.stdout.write(job["nonce"] + json.dumps(results) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

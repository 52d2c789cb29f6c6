"""The code sandbox against hostile programs: each attack is contained, the program is scored as
failed, and nothing on the host changes. Runs every isolation this machine offers (namespaces when
root with util-linux `unshare`, and always the rlimits-only fallback)."""

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from r1pipe.rewards.sandbox import SandboxLimits, _pids_of_uid, isolation_mode, run_in_sandbox

MODES = sorted({isolation_mode(), "rlimits"})
FAST = SandboxLimits(wall_s=10.0, case_wall_s=1.0, nproc=16)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def test_runs_the_program_on_each_input(mode):
    res = run_in_sandbox("import sys\nprint(sum(map(int, sys.stdin.read().split())))", ["1 2", "40 2"], FAST, mode)
    assert res.error is None and [c.stdout for c in res.cases] == ["3\n", "42\n"]
    assert all(c.ok for c in res.cases)


def test_working_dir_is_empty_and_environment_scrubbed(mode, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("R1PIPE_TEST_SECRET", secret)
    code = "import os\nprint(sorted(os.listdir('.')))\nprint(sorted(os.environ))"
    res = run_in_sandbox(code, [""], FAST, mode)
    listing, env = res.cases[0].stdout.splitlines()
    assert listing == "['solution.py']"
    assert "R1PIPE_TEST_SECRET" not in env and secret not in res.cases[0].stdout


def test_infinite_loop_is_killed(mode):
    start = time.monotonic()
    res = run_in_sandbox("while True:\n    pass\n", [""], FAST, mode)
    assert all(c.timed_out and not c.ok for c in res.cases)
    assert time.monotonic() - start < 6


def test_fork_bomb_is_contained_and_leaves_nothing(mode):
    bomb = textwrap.dedent(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    start = time.monotonic()
    res = run_in_sandbox(bomb, [""], FAST, mode)
    assert time.monotonic() - start < 10
    assert not res.cases or not res.cases[0].ok
    if res.uid is not None:  # every process of the run's private uid is gone
        assert _pids_of_uid(res.uid) == []


def test_allocating_50_gb_fails(mode):
    res = run_in_sandbox("x = bytearray(50 * 2**30)\nprint('allocated')", [""], FAST, mode)
    case = res.cases[0]
    assert not case.ok and "allocated" not in case.stdout and "MemoryError" in case.stderr


def test_large_output_file_is_capped(mode):
    res = run_in_sandbox("open('big', 'wb').write(b'x' * (64 << 20))\nprint('wrote')", [""], FAST, mode)
    assert not res.cases[0].ok and "wrote" not in res.cases[0].stdout  # RLIMIT_FSIZE (16 MB)


def test_writes_outside_the_temp_dir_do_not_reach_the_host(mode, tmp_path):
    token = secrets.token_hex(6)
    targets = [tmp_path / "escape.txt", f"/tmp/r1pipe-escape-{token}", f"/var/tmp/r1pipe-escape-{token}",
               f"/dev/shm/r1pipe-escape-{token}", f"/r1pipe-escape-{token}"]
    code = textwrap.dedent(
        f"""
        open('inside.txt', 'w').write('fine')
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, 'w').write('escaped')
                print('wrote', path)
            except OSError as e:
                print('refused', path, e.errno)
        """
    )
    try:
        res = run_in_sandbox(code, [""], FAST, mode)
        assert res.cases[0].returncode == 0, res.cases[0].stderr  # it ran; inside.txt was allowed
        leaked = [str(t) for t in targets if os.path.exists(t)]
        if mode == "rlimits":  # no private tmpfs: world-writable dirs are shared with the host
            leaked = [t for t in leaked if not t.startswith(("/tmp/", "/var/tmp/", "/dev/shm/"))]
        assert leaked == []
    finally:
        for t in targets:
            try:
                os.unlink(t)
            except OSError:
                pass


def test_parent_environment_and_proc_are_unreadable(mode, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("R1PIPE_TEST_SECRET", secret)
    code = textwrap.dedent(
        f"""
        import os
        for pid in ({os.getpid()}, os.getppid(), 1):
            try:
                print(open(f'/proc/{{pid}}/environ', 'rb').read())
            except OSError as e:
                print('refused', pid, e.errno)
        print(dict(os.environ))
        """
    )
    res = run_in_sandbox(code, [""], FAST, mode)
    assert res.cases[0].returncode == 0
    assert secret not in res.cases[0].stdout + res.cases[0].stderr


def test_no_socket_reaches_localhost(mode):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = textwrap.dedent(
            f"""
            import socket
            try:
                s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
                s.sendall(b'hello')
                print('CONNECTED')
            except OSError as e:
                print('refused', e)
            """
        )
        res = run_in_sandbox(code, [""], FAST, mode)
        assert "CONNECTED" not in res.cases[0].stdout and "refused" in res.cases[0].stdout
        with pytest.raises(BlockingIOError):
            listener.accept()


# Run by a helper interpreter: it starts the sandbox, so it is the "parent" the program tries to kill.
KILLER = """
import os, sys
from r1pipe.rewards.sandbox import SandboxLimits, run_in_sandbox
code = (
    "import os, signal\\n"
    f"for pid in ({os.getpid()}, os.getppid()):\\n"
    "    try:\\n"
    "        os.kill(pid, signal.SIGKILL)\\n"
    "        print('killed', pid)\\n"
    "    except OSError as e:\\n"
    "        print('refused', pid, e.errno)\\n"
)
res = run_in_sandbox(code, [""], SandboxLimits(wall_s=10.0, case_wall_s=1.5), sys.argv[1])
print(res.cases[0].stdout)
"""


def test_os_kill_of_the_parent_fails(mode):
    """The sandbox's parent is a helper process here, so a containment failure kills the helper
    (and fails this test), never pytest."""
    helper = subprocess.run([sys.executable, "-c", KILLER, mode], capture_output=True, text=True, timeout=120)
    assert helper.returncode == 0, helper.stderr
    lines = helper.stdout.split("\n")
    assert lines[0].startswith("refused"), helper.stdout  # the process that started the sandbox
    if os.geteuid() == 0:  # the program runs as a throwaway uid: its own parent is out of reach too
        assert lines[1].startswith("refused"), helper.stdout

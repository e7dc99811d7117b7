"""tests/dist/launch.py: torchrun is the running interpreter's `-m torch.distributed.run`, and a
launch that outlives its timeout is killed with every process it started (torchrun's workers run
in sessions of their own), failing the test with the timeout named instead of hanging it."""

import sys
import time

import pytest

from tests.dist import launch


def test_torchrun_is_the_running_interpreters_module():
    cmd = launch.torchrun_command(2, "w.py", ["--x", 1], master_port=1234)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == ["--nproc-per-node", "2", "--master-port", "1234", "w.py", "--x", "1"]


def test_the_environment_caps_every_launch_timeout(monkeypatch):
    monkeypatch.delenv(launch.TIMEOUT_ENV, raising=False)
    assert launch.launch_timeout(600) == 600
    monkeypatch.setenv(launch.TIMEOUT_ENV, "90")
    assert launch.launch_timeout(600) == 90 and launch.launch_timeout(30) == 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees are read from /proc")
def test_a_hung_launch_is_killed_with_processes_in_sessions_of_their_own(tmp_path):
    pid_file = tmp_path / "pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('worker started', flush=True)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"was killed after 2 s \(watchdog") as failure:
        launch.run_watched([sys.executable, "-c", script], timeout=2, env=launch.worker_env())
    assert time.monotonic() - start < 15
    assert "worker started" in str(failure.value)  # the output so far is in the failure
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"process {pid} (own session) survived the watchdog")

"""Child processes die with their parent.

megatron-core's dist_checkpointing writes with helper processes: `FileSystemWriterAsync` forks one
writer per bucket (multiprocessing 'fork') and keeps a `Manager()` queue server ('spawn'); async
saves add a persistent 'spawn' worker. After a SIGKILL of the trainer these stay behind (hundreds of
MB each, a Manager server ignores SIGTERM). `make_children_die_with_parent` has every child forked or
spawned by multiprocessing ask the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG,
Linux; elsewhere nothing changes):
- fork: an `os.register_at_fork` hook in the child;
- spawn/forkserver: the child's `python -c` command line starts with the same prctl call.
The kernel sends the signal when the *thread* that created the child ends, so children created from
any thread but the main one are left alone.

`kill_process_tree` ends a command and everything it started, for watchdogs (tests' torchrun
launches, `make gpu-check`'s phase budgets).
"""

import ctypes
import multiprocessing.spawn as spawn
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_installed = False
_forked_from_main_thread = False  # set in the parent just before a fork, read in the child
_parent_pid = 0


def die_with_parent(parent_pid: int) -> None:
    """In a child: get SIGKILL when the parent dies; exit now if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _before_fork():
    global _forked_from_main_thread, _parent_pid
    _forked_from_main_thread = threading.current_thread() is threading.main_thread()
    _parent_pid = os.getpid()


def _after_fork_in_child():
    if _forked_from_main_thread:
        die_with_parent(_parent_pid)


def _spawn_prefix() -> str:
    return (
        f"import ctypes,os;ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG},{int(signal.SIGKILL)},0,0,0);"
        f"os.getppid()=={os.getpid()} or os._exit(1);"
    )


def make_children_die_with_parent() -> None:
    """Install both hooks (idempotent; Linux only)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)

    original = spawn.get_command_line

    def get_command_line(**kwds):
        cmd = original(**kwds)
        if threading.current_thread() is threading.main_thread() and "-c" in cmd:
            i = cmd.index("-c") + 1
            cmd = [*cmd[:i], _spawn_prefix() + cmd[i], *cmd[i + 1 :]]
        return cmd

    spawn.get_command_line = get_command_line


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc (Linux; elsewhere [])."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every descendant, also those in sessions of their own
    (torchrun starts each worker in a new session: killing torchrun's group leaves them running)."""
    tree = descendants(pid)  # before anyone dies: orphans lose their link to `pid`
    for target in [pid, *tree]:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

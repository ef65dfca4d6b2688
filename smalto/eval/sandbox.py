"""Run untrusted programs (model-generated code) in a contained child process.

    out = run_sandboxed(["python3", "-I", "-c", src], stdin=b"...", limits=Limits(wall_s=5))
    out.ok, out.stdout, out.timed_out

Every run gets:
  a throwaway working directory (HOME and TMPDIR point there), removed afterwards
  an environment holding only PATH, HOME, TMPDIR and LANG: no tokens, keys or other secrets of the caller
  resource limits (prlimit): CPU seconds, address space, file size, process count, no core files
  a wall-clock limit, after which the run is killed together with every process it started
and, where the machine allows it (`containment()` says which applied and why):
  a private network namespace (`unshare --net`): only a loopback device that is down, so no connection leaves
  a private PID namespace: when the run ends or is killed, the kernel kills every process left inside it, even
      ones that called setsid() to leave the process group
  (as root) an unprivileged uid of its own: RLIMIT_NPROC holds (root is exempt from it), the caller's files and
      folders that are not world-writable cannot be written, and no run can signal another

Where a part is missing the run still goes ahead, contained by the rest; `containment().notes` names what is
missing (shown once as a warning). Without a PID namespace the process group is killed; without an own uid, a
run can write what the evaluating user can write. The sandbox protects the machine, not the verdict: code that
sets out to forge its own test result can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_UID_BASE = 3_470_000  # uids no account uses; slot i runs as _UID_BASE + i
_MB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Limits:
    wall_s: float = 5.0  # llm-foundry's per-test-case timeout
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 2048  # RLIMIT_AS (g++ and node fit in it)
    file_mb: int = 16  # RLIMIT_FSIZE: also caps the captured stdout / stderr
    nproc: int = 32  # RLIMIT_NPROC (enforced under the sandbox's own uid)
    output_chars: int = 65536  # stdout / stderr kept


@dataclass
class Outcome:
    returncode: int | None  # None when killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    fetched: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Containment:
    uid: int | None  # base uid for runs (root only); None: runs keep the caller's uid
    network: bool  # private network namespace
    pid_namespace: bool
    unshare: tuple[str, ...]  # the unshare prefix ('' parts dropped)
    notes: tuple[str, ...] = field(default=())


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def containment() -> Containment:
    """What this machine allows, probed once per process."""
    notes: list[str] = []
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    if shutil.which("prlimit") is None:
        notes.append("prlimit (util-linux) is missing: runs are not resource-limited")
    if unshare is None:
        notes.append(
            "unshare (util-linux) is missing: runs can reach the network and may leave processes behind"
        )
        return Containment(None, False, False, (), tuple(notes))
    ns = [unshare, "--net", "--pid", "--fork", "--kill-child"]
    if root:
        uid = _UID_BASE
        if _probe([*ns, "--setuid", str(uid), "--setgid", str(uid), "true"]):
            return Containment(uid, True, True, tuple(ns), tuple(notes))
        if _probe([*ns, "--setuid", "65534", "--setgid", "65534", "true"]):
            notes.append(
                "uids outside the system range are not available: every run shares uid 65534 (nobody)"
            )
            return Containment(65534, True, True, tuple(ns), tuple(notes))
        notes.append("cannot change uid: runs keep root's rights (RLIMIT_NPROC does not hold for root)")
        if _probe([*ns, "true"]):
            return Containment(None, True, True, tuple(ns), tuple(notes))
    userns = [unshare, "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
    if _probe([*userns, "true"]):
        notes.append(
            "not root: runs keep the evaluating user's file rights (a user namespace isolates the rest)"
        )
        return Containment(None, True, True, tuple(userns), tuple(notes))
    notes.append(
        "namespaces are not available (unshare failed): runs can reach the network; leftovers are killed by "
        "process group"
    )
    return Containment(None, False, False, (), tuple(notes))


@lru_cache(maxsize=1)
def warn_about_gaps() -> tuple[str, ...]:
    """Warn once per process about each part of the containment this machine lacks; returns them."""
    import warnings

    notes = containment().notes
    for n in notes:
        warnings.warn(f"code sandbox: {n}", stacklevel=2)
    return notes


class _Slots:
    """Uids for concurrent runs: each run holds one, so RLIMIT_NPROC counts only its own processes."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return self._next - 1

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)


_SLOTS = _Slots()


def _pids_of(uid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{p}").st_uid == uid:
                    pids.append(int(p))
    return pids


def _own_processes(uid: int) -> int:
    return len(_pids_of(uid))


def _command(argv: list[str], limits: Limits, c: Containment, uid: int | None) -> list[str]:
    cmd: list[str] = []
    if shutil.which("prlimit"):
        # NPROC counts every process of the uid; under the caller's own uid leave room for what it already runs
        nproc = limits.nproc if uid is not None else _own_processes(os.geteuid()) + limits.nproc
        cmd += [
            "prlimit",
            f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--as={limits.memory_mb * _MB}",
            f"--fsize={limits.file_mb * _MB}",
            f"--nproc={nproc}",
            "--core=0",
            "--",
        ]
    cmd += list(c.unshare)
    if uid is not None:
        cmd += ["--setuid", str(uid), "--setgid", str(uid)]
    if c.unshare:
        cmd.append("--")
    return cmd + argv


def _kill(proc: subprocess.Popen[bytes], uid: int | None) -> None:
    """Kill the run's process group, then (under an own uid) anything still running as that uid, and wait briefly
    until it is gone, so the next run on this slot starts with a clean process count. In a PID namespace the
    kernel kills everything inside once its first process dies."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if uid is None or uid == 65534:
        return
    deadline = time.monotonic() + 2.0
    while (left := _pids_of(uid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_sandboxed(
    argv: list[str],
    *,
    stdin: bytes = b"",
    limits: Limits | None = None,
    files: dict[str, str | bytes] | None = None,
    fetch: str | None = None,
) -> Outcome:
    """Run `argv` contained (see the module docstring) in a fresh working directory holding `files` (bytes are
    written executable: a compiled program). `fetch` names a file the run makes, returned as Outcome.fetched."""
    limits = limits or Limits()
    c = containment()
    slot = _SLOTS.take()
    uid = None if c.uid is None else (c.uid if c.uid == 65534 else c.uid + slot)
    wd = Path(tempfile.mkdtemp(prefix="smalto-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="smalto-sandbox-out-"))  # the caller's, not writable by the run
    try:
        for name, content in (files or {}).items():
            f = wd / name
            f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
            f.chmod(0o755 if isinstance(content, bytes) else 0o644)
        if uid is not None:
            for f in (wd, *wd.iterdir()):
                os.chown(f, uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(wd), "TMPDIR": str(wd), "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                _command(argv, limits, c, uid),
                cwd=wd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.communicate(stdin, timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc, uid)
                proc.wait()
        fetched = None
        if fetch is not None and not timed_out and (wd / fetch).is_file() and not (wd / fetch).is_symlink():
            fetched = (wd / fetch).read_bytes()
        return Outcome(
            returncode=None if timed_out else proc.returncode,
            stdout=_read(logs / "stdout", limits.output_chars),
            stderr=_read(logs / "stderr", limits.output_chars),
            timed_out=timed_out,
            seconds=time.perf_counter() - t0,
            fetched=fetched,
        )
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(wd, ignore_errors=True)
        _SLOTS.give(slot)

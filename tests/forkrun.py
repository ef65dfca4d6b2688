"""`python -m MODULE ARGS` and `python SCRIPT.py ARGS` for the tests, with torch imported once: `run` has the
signature of `subprocess.run`.

A CLI test runs smalto in a process of its own, as a user does; most of such a process's time on the CI machine
is importing torch (about 3 s of CPU each time). So each test worker keeps one warm process (the zygote, this file
run as a script) that has imported torch and nothing of smalto's; `run` asks it to fork a child, which sets the
environment, folder, argv and standard streams it was given and runs the module as `python -m` would
(`runpy.run_module(..., run_name="__main__")`), then exits as the interpreter does (non-daemon threads joined,
atexit handlers, flushed streams, an exit code from SystemExit, 1 and a traceback for an exception) without its
teardown of every module. Exit codes, stdout and stderr are the child's own.

Not forked, run as a plain subprocess: anything but `[sys.executable, "-m", module, ...]` or
`[sys.executable, "path.py", ...]`, an environment whose PYTHON* variables (but PYTHONPATH and PYTHONUNBUFFERED)
differ from this process's, and a PYTHONPATH with a sitecustomize or usercustomize (they act at interpreter start,
which a fork has passed; PYTHONPATH's folders are otherwise put on the child's `sys.path`). Set
SMALTO_TEST_NO_FORK=1 to run every command as a plain subprocess.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_zygote: subprocess.Popen | None = None


def _python_vars(env: dict[str, str]) -> dict[str, str]:
    skip = ("PYTHONUNBUFFERED", "PYTHONPATH")
    return {k: v for k, v in env.items() if k.startswith("PYTHON") and k not in skip}


def _plain_path(env: dict[str, str]) -> bool:
    """PYTHONPATH's folders hold no sitecustomize / usercustomize (which act at interpreter start)."""
    return not any(
        (Path(d) / f"{name}.py").exists()
        for d in env.get("PYTHONPATH", "").split(os.pathsep)
        if d
        for name in ("sitecustomize", "usercustomize")
    )


def _forkable(cmd: Any, kwargs: dict[str, Any]) -> bool:
    if os.environ.get("SMALTO_TEST_NO_FORK") == "1" or not hasattr(os, "fork"):
        return False
    if not isinstance(cmd, list | tuple) or len(cmd) < 2 or cmd[0] != sys.executable:
        return False
    if not ((cmd[1] == "-m" and len(cmd) > 2) or str(cmd[1]).endswith(".py")):
        return False
    if set(kwargs) - {"input", "capture_output", "text", "env", "cwd", "timeout", "check"}:
        return False
    env = kwargs.get("env")
    return env is None or (_python_vars(env) == _python_vars(dict(os.environ)) and _plain_path(env))


def _start() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen(
        [sys.executable, __file__],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )


def run(cmd: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, **kwargs)`, forked from the warm process when it can be (see the module's text)."""
    if not _forkable(cmd, kwargs):
        return subprocess.run(cmd, **kwargs)
    global _zygote
    text = bool(kwargs.get("text"))
    data = kwargs.get("input")
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp, _lock:
        files = {name: str(Path(tmp) / name) for name in ("stdin", "stdout", "stderr")}
        Path(files["stdin"]).write_bytes(data.encode() if isinstance(data, str) else (data or b""))
        module = cmd[1] == "-m"
        request = {
            "module": cmd[2] if module else None,
            "script": None if module else str(cmd[1]),
            "args": [str(a) for a in cmd[3 if module else 2 :]],
            "cwd": str(kwargs.get("cwd") or os.getcwd()),
            "env": dict(kwargs.get("env") or os.environ),
            "capture": bool(kwargs.get("capture_output")),
            **files,
        }
        if _zygote is None or _zygote.poll() is not None:
            _zygote = _start()
        assert _zygote.stdin is not None and _zygote.stdout is not None
        _zygote.stdin.write(json.dumps(request) + "\n")
        _zygote.stdin.flush()
        pid = json.loads(_zygote.stdout.readline())["pid"]
        timeout = kwargs.get("timeout")
        ready, _, _ = select.select([_zygote.stdout], [], [], timeout)
        timed_out = not ready
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        rc = json.loads(_zygote.stdout.readline())["rc"]
        out, err = (Path(files[n]).read_bytes() for n in ("stdout", "stderr"))
    stdout: Any = out.decode(errors="replace") if text else out
    stderr: Any = err.decode(errors="replace") if text else err
    if not request["capture"]:  # the child's output goes where this process's goes, as with subprocess.run
        sys.stdout.write(out.decode(errors="replace"))
        sys.stderr.write(err.decode(errors="replace"))
        stdout = stderr = None
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout or 0, output=stdout, stderr=stderr)
    p = subprocess.CompletedProcess(cmd, rc, stdout, stderr)
    if kwargs.get("check"):
        p.check_returncode()
    return p


# ---------------------------------------------------------------- the zygote (this file run as a script)


def _child(req: dict[str, Any], pipes: tuple[int, int]) -> None:
    """In the forked child: become `python -m MODULE ARGS` in its folder, environment and streams; exit."""
    import atexit
    import runpy
    import traceback

    for fd in pipes:
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    for target, (name, flags) in enumerate(
        [("stdin", os.O_RDONLY), ("stdout", os.O_WRONLY | os.O_CREAT), ("stderr", os.O_WRONLY | os.O_CREAT)]
    ):
        fd = os.open(req[name], flags, 0o600)
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
        os.set_inheritable(target, True)  # a process it starts gets them, as from any process's 0, 1, 2
    # the interpreter's streams anew, on the new descriptors (the zygote's stdin may hold read-ahead)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    unbuffered = bool(req["env"].get("PYTHONUNBUFFERED"))
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1 if unbuffered else -1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
    script = req["script"]
    sys.argv = [script or req["module"], *req["args"]]
    # as `python -m` puts the working folder first, and `python SCRIPT` the script's folder
    sys.path[0] = os.path.dirname(os.path.abspath(script)) if script else req["cwd"]
    extra = [d for d in req["env"].get("PYTHONPATH", "").split(os.pathsep) if d]
    sys.path[1:1] = [os.path.abspath(d) for d in extra]  # where PYTHONPATH puts them
    threads = req["env"].get("OMP_NUM_THREADS", "")
    if threads.isdigit():  # torch read it at import, in the zygote, which is started without it
        import torch

        torch.set_num_threads(int(threads))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:  # what the interpreter makes of it
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    # the interpreter's exit without its slow teardown of every module: non-daemon threads, atexit, streams
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _serve() -> None:
    import torch  # noqa: F401  # the point: imported once, before any fork

    inbox, outbox = sys.stdin, sys.stdout
    pipes = (inbox.fileno(), outbox.fileno())
    for line in inbox:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(
                req, pipes
            )  # a SystemExit from here unwinds to the interpreter's exit: no frame catches it
            raise SystemExit(0)
        outbox.write(json.dumps({"pid": pid}) + "\n")
        outbox.flush()
        _, status = os.waitpid(pid, 0)
        outbox.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        outbox.flush()


if __name__ == "__main__":
    _serve()

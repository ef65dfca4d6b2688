"""Run a code completion against its test cases, each in the sandbox, as llm-foundry's code evaluation does.

One test case = one call `entry_point(*test_input)` compared with `test_output` (llm-foundry's local client):
    python      exec(prompt + completion) in a fresh module, call, compare with eval(output) (or the raw string
                when it does not evaluate); any exception fails
    c++         prompt + completion after `issame` overloads (vectors, maps, floats within 1e-4, doubles within
                1e-3), compiled with g++ -std=c++11; the program prints issame(entry_point(input), output): "1"
    javascript  node prints JSON.stringify(entry_point(input)) === JSON.stringify(output): "true"
A completion passes when every test case passes. Each test case runs in its own process with llm-foundry's
5 s timeout. C++ compiles once per completion (one program, the test case picked by argv: a test case whose
expression does not compile fails the completion either way) under its own, longer limit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import replace
from functools import lru_cache

from smalto.eval.sandbox import Limits, run_sandboxed

LANGUAGES = ("python", "c++", "javascript")
COMPILE_LIMITS = Limits(wall_s=60, cpu_s=60)

# Reads {"code", "input", "output", "entry_point", "token"} on stdin; prints the token and 1 or 0 on the stdout
# it keeps for itself (the completion's own prints go to /dev/null).
_PY_CHECK = """\
import json, os, sys, types
p = json.loads(sys.stdin.read())
verdict = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.dup2(null, 2)
ok = False
try:
    mod = types.ModuleType("test_module")
    exec(p["code"], mod.__dict__)
    result = mod.__dict__[p["entry_point"]](*eval(p["input"]))
    try:
        expected = eval(p["output"])
    except Exception:
        expected = p["output"]
    ok = bool(result == expected)
except BaseException:
    ok = False
verdict.write(p["token"] + ("1" if ok else "0"))
verdict.flush()
"""

_CPP_PRELUDE = """\
#include <cstdlib>
#include <iostream>
#include <vector>
#include <string>
#include <map>
#include <math.h>
using namespace std;
bool issame(vector<string> a, vector<string> b) { return a == b; }
bool issame(float a, float b) { return abs(a - b) < 1e-4; }
bool issame(bool a, bool b) { return a == b; }
bool issame(int a, int b) { return a == b; }
bool issame(vector<int> a, vector<int> b) { return a == b; }
bool issame(string a, string b) { return a == b; }
bool issame(vector<float> a, vector<float> b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); i++) if (abs(a[i] - b[i]) > 1e-4) return false;
    return true;
}
bool issame(double a, double b) { return abs(a - b) < 1e-3; }
bool issame(vector<vector<int>> a, vector<vector<int>> b) { return a == b; }
bool issame(map<char, int> a, map<char, int> b) { return a == b; }
bool issame(long long a, long long b) { return a == b; }
"""


@lru_cache(maxsize=1)
def python_for_sandbox() -> str | None:
    """An interpreter the sandbox's uid can run (the caller's may sit in a private home folder)."""
    for exe in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        if os.path.isfile(exe) and run_sandboxed([exe, "-I", "-c", "print(1)"], limits=Limits(wall_s=30)).ok:
            return exe
    return None


def missing_tool(language: str) -> str | None:
    """Why completions in `language` cannot run here (None when they can)."""
    if language == "python":
        return None if python_for_sandbox() else "no Python interpreter the sandbox can run"
    if language == "c++":
        return None if shutil.which("g++") else "g++ is not installed"
    if language == "javascript":
        return None if shutil.which("node") else "node is not installed"
    return f"language {language!r} is not supported (supported: {', '.join(LANGUAGES)})"


def cpp_program(code: str, entry_point: str, inputs: list[str], outputs: list[str]) -> str:
    """The C++ file for one completion: prelude, code, and a main that checks test case argv[1]."""
    cases = "".join(
        f"    if (t == {i}) cout << issame({entry_point}({x}), {y});\n"
        for i, (x, y) in enumerate(zip(inputs, outputs, strict=True))
    )
    return f"{_CPP_PRELUDE}{code}\nint main(int argc, char** argv) {{\n    int t = atoi(argv[1]);\n{cases}    return 0;\n}}\n"


def js_program(code: str, entry_point: str, test_input: str, test_output: str) -> str:
    return (
        f"{code}\nconsole.log(JSON.stringify({entry_point}({test_input})) === JSON.stringify({test_output}));"
    )


def passes(
    code: str, entry_point: str, inputs: list[str], outputs: list[str], language: str, limits: Limits
) -> bool:
    """Whether `code` (prompt + completion) passes every test case; stops at the first failure."""
    if language == "python":
        exe = python_for_sandbox()
        assert exe is not None, "check missing_tool('python') first"
        for x, y in zip(inputs, outputs, strict=True):
            token = secrets.token_hex(8)
            payload = json.dumps(
                {"code": code, "input": x, "output": y, "entry_point": entry_point, "token": token}
            )
            out = run_sandboxed([exe, "-I", "-c", _PY_CHECK], stdin=payload.encode(), limits=limits)
            if out.timed_out or out.stdout != token + "1":
                return False
        return True
    if language == "c++":
        compiled = run_sandboxed(
            ["g++", "-std=c++11", "prog.cpp", "-o", "prog"],
            files={"prog.cpp": cpp_program(code, entry_point, inputs, outputs)},
            limits=replace(COMPILE_LIMITS, memory_mb=max(limits.memory_mb, COMPILE_LIMITS.memory_mb)),
            fetch="prog",
        )
        if not compiled.ok or compiled.fetched is None:
            return False
        for i in range(len(inputs)):
            out = run_sandboxed(["./prog", str(i)], files={"prog": compiled.fetched}, limits=limits)
            if out.timed_out or out.stdout != "1":
                return False
        return True
    if language == "javascript":
        for x, y in zip(inputs, outputs, strict=True):
            out = run_sandboxed(
                ["node", "prog.js"], files={"prog.js": js_program(code, entry_point, x, y)}, limits=limits
            )
            if out.timed_out or out.stdout != "true\n":
                return False
        return True
    raise ValueError(f"language {language!r} is not supported (supported: {', '.join(LANGUAGES)})")

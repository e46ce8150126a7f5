"""The `code` tool of bench/corrections: runs a model-written program, then the task's check.

usage: python3 launcher.py TASK.json   (stdin: {"program": "..."}, as Keel's
`params_on_stdin = true` writes it)

The program runs with exec() in a fresh namespace, its stdout swallowed; it must set
`result` (JSON-serialisable). Then the task's `check` (Python, assertions on `result`
only: the program cannot see or patch it) runs. Success: stdout {"result": ...}, exit 0.
Any exception in the program or the check, a missing or unserialisable `result`:
stderr's first line `TypeName: message`, then where (a program line, or "in the task's
check"), exit 3 — keel.toml classifies exit 3 as `code_error`. The whole stderr stays
under 300 characters: Keel keeps the last 300 of a failed command's stderr, and the
first line is what its correction loop reads (the error kind, the repeat check).

This is a plain child process (Keel's command tool: own process group, clean
environment, scratch directory, the tool's timeout) — not a sandbox.
"""

import contextlib
import io
import json
import sys
import traceback


def fail(e, where=""):
    message = str(e).splitlines()[0] if str(e).strip() else "(no message)"
    line = f"{type(e).__name__}: {message}"
    if len(line) > 200:
        line = line[:197] + "..."
    sys.stderr.write(line + "\n" + where[:90] + "\n")
    sys.exit(3)


def where_in(program, e):
    if isinstance(e, SyntaxError) and e.lineno:
        return f"  at line {e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<program>"]
    if not frames:
        return ""
    n = frames[-1].lineno
    lines = program.splitlines()
    text = lines[n - 1].strip() if 0 < n <= len(lines) else ""
    return f"  at line {n}: {text}"


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        task = json.load(f)
    program = json.load(sys.stdin).get("program")
    if not isinstance(program, str):
        fail(TypeError("`program` must be a string"))
    ns = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(program, "<program>", "exec"), ns)
    except BaseException as e:  # SystemExit and KeyboardInterrupt are the program's too
        fail(e, where_in(program, e))
    if "result" not in ns:
        fail(NameError("the program did not set `result`"))
    result = ns["result"]
    try:
        json.dumps(result)
    except (TypeError, ValueError) as e:
        fail(TypeError(f"`result` is not JSON-serialisable: {e}"))
    try:
        exec(compile(task["check"], "<check>", "exec"), {"result": result})
    except BaseException as e:
        fail(e, "  in the task's check")
    print(json.dumps({"result": result}))


if __name__ == "__main__":
    main()

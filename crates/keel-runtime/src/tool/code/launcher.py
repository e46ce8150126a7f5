# Keel's code-tool launcher (run with `python3 -I -c`, its limits as JSON in argv[1]).
#
# Trusted code: everything here runs before the model's program, which starts only
# at `exec`. It reads {"program", "input"} from stdin, sets the resource limits,
# drops root to `nobody` when it was started as root, runs the program in a fresh
# namespace and writes ONE JSON document, the outcome, to the original stdout — a
# channel the program's own output never reaches (its stdout is moved onto stderr).
#
#   {"ok": true, "result": <value>}
#   {"ok": false, "error": {"type": "KeyError", "message": "'total'",
#                           "traceback": [{"line": 3, "function": "<module>", "code": "..."}]}}
#
# A program that dies before the launcher can write (a signal, os._exit) writes
# nothing: Keel classifies the exit status instead.

import errno
import json
import os
import resource
import select
import signal
import sys
import traceback

PROGRAM = "<program>"


class CPUTimeExceeded(BaseException):
    """The program used up its CPU time (RLIMIT_CPU's soft limit, SIGXCPU).

    A BaseException, so that `except Exception` in the program does not swallow it;
    the hard limit, a second later, kills the process whatever it catches."""


def main():
    cfg = json.loads(sys.argv[1])
    dumps, write, exit_now, getpid = json.dumps, os.write, os._exit, os.getpid
    outcome_fd = os.dup(1)  # not inheritable (PEP 446): children never hold it
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)
    request = json.loads(sys.stdin.buffer.read() or b"{}")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    program = request.get("program")
    source = program if isinstance(program, str) else ""
    lines = source.splitlines()

    def send(doc):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        data = dumps(doc, allow_nan=False).encode()
        while data:
            n = write(outcome_fd, data)
            data = data[n:]
        exit_now(0)

    def fail(kind, message, frames=()):
        send({"ok": False, "error": {"type": kind, "message": message, "traceback": list(frames)}})

    mem = cfg["memory_bytes"]
    cpu = cfg["cpu_seconds"]
    procs = cfg["max_processes"]
    fsize = cfg["max_file_bytes"]
    nofile = cfg["max_open_files"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))
    drop = cfg.get("drop_to")
    if drop is not None and os.geteuid() == 0:
        # Root is exempt from RLIMIT_NPROC and owns every root file: never run as it.
        try:
            import ctypes
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except Exception as e:
            fail("LauncherError", "ctypes is needed to drop root safely: %s" % e)
        os.setgroups([])
        os.setgid(drop)
        os.setuid(drop)
        if os.getuid() == 0 or os.geteuid() == 0:
            fail("LauncherError", "could not drop root privileges")
        # Changing the uid cleared the parent-death signal that bwrap's
        # --die-with-parent and unshare's --kill-child set: set it again, so that the
        # launcher and its namespace die with the sandbox's process whatever happens.
        if prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            fail("LauncherError", "cannot set the parent-death signal: errno %d" % ctypes.get_errno())
        # The parent may have died just before: then Keel closed its end of the
        # outcome pipe first (it closes the pipes before it kills), so stop here.
        poll = select.poll()
        poll.register(outcome_fd, select.POLLOUT)
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0)):
            exit_now(1)
    # Only now, with the parent-death signal set again, leave Keel's process group
    # (and its terminal): until here a kill of the group reaches the launcher.
    if cfg.get("new_session"):
        os.setsid()
    # No set-uid program can give the program back what the launcher gave up (bwrap
    # sets this too; under rlimits nothing else does).
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            fail("LauncherError", "cannot set no_new_privs: errno %d" % ctypes.get_errno())
    except ImportError:
        if drop is not None:
            fail("LauncherError", "ctypes is needed to drop root safely")
    # After the drop: the scratch directory is nobody's, and root without
    # CAP_DAC_OVERRIDE (bwrap's) cannot enter it.
    os.chdir(cfg["cwd"])
    # Last: the launcher itself needs memory to start.
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    def on_xcpu(signum, frame):
        raise CPUTimeExceeded("the program used its %d s of CPU time" % cpu)

    signal.signal(signal.SIGXCPU, on_xcpu)

    def frames_of(tb):
        found = []
        for fs in traceback.extract_tb(tb):
            if fs.filename == PROGRAM:
                code = lines[fs.lineno - 1].strip() if fs.lineno and 0 < fs.lineno <= len(lines) else ""
                found.append({"line": fs.lineno, "function": fs.name, "code": code[:200]})
        return found[-8:]

    def limit_note(e):
        if isinstance(e, MemoryError):
            return " (the sandbox's memory limit is %d MiB)" % (mem >> 20)
        code = getattr(e, "errno", None)
        if code == errno.EFBIG:
            return " (the sandbox's file size limit is %d MiB)" % (fsize >> 20)
        if code == errno.EAGAIN and isinstance(e, BlockingIOError):
            return " (the sandbox allows %d processes)" % procs
        if code == errno.EMFILE:
            return " (the sandbox allows %d open files)" % nofile
        return ""

    def describe(e):
        text = str(e)
        if isinstance(e, MemoryError) and not text:
            text = "the program ran out of memory"
        return text[:2000] + limit_note(e)

    if not isinstance(program, str):
        fail("TypeError", "`program` must be a string of Python code")
    try:
        code = compile(source, PROGRAM, "exec", dont_inherit=True)
    except SyntaxError as e:
        text = (e.text or "").strip()
        frame = {"line": e.lineno or 0, "function": "<module>", "code": text[:200]}
        fail(type(e).__name__, "%s (line %s)" % (e.msg, e.lineno), [frame])
    except (ValueError, MemoryError) as e:
        fail(type(e).__name__, describe(e))

    me = getpid()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__, "input": request.get("input")}
    try:
        exec(code, namespace)
    except BaseException as e:
        if getpid() != me:
            exit_now(1)  # a forked child of the program: only the program reports
        if isinstance(e, SystemExit) and e.code in (0, None) and "result" in namespace:
            pass  # `sys.exit()` after setting `result`: a normal end
        elif isinstance(e, SystemExit):
            fail("SystemExit", "the program called exit(%r)" % (e.code,), frames_of(e.__traceback__))
        else:
            fail(type(e).__name__, describe(e), frames_of(e.__traceback__))
    if getpid() != me:
        exit_now(0)
    if "result" not in namespace:
        fail("NameError", "the program did not set the global `result`")
    try:
        text = dumps(namespace["result"], allow_nan=False)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        fail("TypeError", "`result` is not JSON-serialisable: %s" % str(e)[:500])
    except MemoryError as e:
        fail("MemoryError", "serialising `result`: " + describe(e))
    if len(text) > cfg["max_result_bytes"]:
        fail("ValueError", "`result` is %d bytes of JSON; the most kept is %d" % (len(text), cfg["max_result_bytes"]))
    body = ('{"ok": true, "result": ' + text + "}").encode()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    while body:
        n = write(outcome_fd, body)
        body = body[n:]
    exit_now(0)


main()

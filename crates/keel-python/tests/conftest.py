"""Fixtures: a throwaway PostgreSQL server (Debian's binaries, as keel-testkit starts
them for the Rust tests), or the one KEEL_TEST_POSTGRES_URL names."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    if os.environ.get("KEEL_TEST_POSTGRES_URL"):
        yield os.environ["KEEL_TEST_POSTGRES_URL"]
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert bins, "PostgreSQL's binaries (scripts/test installs Debian's postgresql)"
    bindir = os.path.dirname(bins[-1])
    root = os.getuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if root else []
    d = tempfile.mkdtemp(prefix="keel-py-pg-")
    if root:
        shutil.chown(d, "postgres", "postgres")
    data = os.path.join(d, "data")
    subprocess.run([*run_as, f"{bindir}/initdb", "-D", data, "-U", "keel", "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--no-instructions"], check=True, capture_output=True)
    port = _free_port()
    subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(d, "server.log"), "-w", "-t", "60",
                    "-o", f"-h 127.0.0.1 -p {port} -k {d} -c fsync=off", "start"], check=True, capture_output=True)
    try:
        yield f"postgres://keel@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)

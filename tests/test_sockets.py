"""ipc endpoints only in private directories: broker, worker and client refuse any other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zeroserve import Client
from zeroserve.config import default_endpoint, runtime_dir
from zeroserve.procs import spawn
from zeroserve.sockets import PrivateDirError, private_ipc

OTHER_UID = 65534  # nobody


def test_default_endpoints_live_in_a_private_runtime_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir("blue") == f"{tmp_path}/zeroserve/blue"
    assert default_endpoint("frontend", "blue") == f"ipc://{tmp_path}/zeroserve/blue/frontend.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir("blue") == os.path.expanduser("~/.zeroserve/run/blue")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    private_ipc(default_endpoint("backend", "blue"))  # created on first use, mode 700
    st = os.stat(tmp_path / "zeroserve" / "blue")
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("how", ["mode", "owner", "symlink"])
def test_a_shared_or_foreign_dir_is_refused_by_broker_worker_and_client(tmp_path, how) -> None:
    bad = tmp_path / "run"
    if how == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        bad.symlink_to(tmp_path / "real")
    else:
        bad.mkdir(mode=0o700)
        if how == "mode":
            bad.chmod(0o777)  # any local user could bind the path first
        else:
            os.chown(bad, OTHER_UID, OTHER_UID)
    endpoint = f"ipc://{bad}/frontend.sock"
    with pytest.raises(PrivateDirError, match="700|directory"):
        private_ipc(endpoint)
    with pytest.raises(PrivateDirError):
        Client(endpoint)
    for role, args in (("broker", ["--frontend", endpoint, "--backend", endpoint + "-b"]),
                       ("worker", ["--broker", endpoint, "--no-pin"])):
        proc = spawn(role, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        assert b"refusing to" in out and b"Traceback" not in out
    assert not (bad / "frontend.sock").exists()


def test_a_squatters_socket_is_never_reached(tmp_ipc) -> None:
    """Another user binds the frontend path first (in a dir they own): the victim's SDK
    refuses to connect, so its prompt never reaches the squatter."""
    tmp_ipc.chmod(0o711)  # a dir of /tmp the other user may pass through
    squat = tmp_ipc / "squat"
    squat.mkdir(mode=0o700)
    os.chown(squat, OTHER_UID, OTHER_UID)
    code = ("import os, zmq, sys; os.setgid(65534); os.setuid(65534); s = zmq.Context()"
            ".socket(zmq.ROUTER); s.bind(sys.argv[1]); print('bound', flush=True);"
            "print(s.poll(3000))")
    endpoint = f"ipc://{squat}/frontend.sock"
    proc = subprocess.Popen([sys.executable, "-c", code, endpoint], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "bound"
        with pytest.raises(PrivateDirError):
            Client(endpoint)
        assert proc.stdout.readline().strip() == "0"  # the squatter heard nothing
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", ["foreign-parent", "group-writable-parent"])
def test_a_directory_someone_else_can_swap_is_refused(tmp_path, how) -> None:
    """The endpoint's own directory is private, but one above it lets another user rename it
    (owned by them inside a shared sticky dir, or writable by others without the sticky bit):
    after a restart they could put their own socket there, so it is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp or a shared XDG_RUNTIME_DIR
    middle = shared / "zeroserve"
    middle.mkdir(mode=0o755)
    if how == "foreign-parent":
        os.chown(middle, OTHER_UID, OTHER_UID)  # they made it first: they may rename in it
    else:
        middle.chmod(0o777)
    mine = middle / "blue"
    mine.mkdir(mode=0o700)
    with pytest.raises(PrivateDirError, match="swap"):
        private_ipc(f"ipc://{mine}/frontend.sock")
    middle.chmod(0o755)
    os.chown(middle, os.geteuid(), os.getegid())
    private_ipc(f"ipc://{mine}/frontend.sock")  # ours all the way up: fine

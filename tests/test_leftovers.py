"""What a run leaves on the machine: nothing after a normal exit, and after a SIGKILL of its whole
process group (which takes multiprocessing's resource tracker with it), nothing once the next run
(or `maskstream doctor`) has found the dead run's shared-memory rings and socket folder by the owner
their names carry, and removed them."""
from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import (
    IPC_PATH_MAX,
    OWNER_FILE,
    Leftovers,
    OutputOptions,
    RunConfig,
    TransportOptions,
    plan,
    remove_dead_runs,
    run_folder,
)
from maskstream.pipeline.runtime.shm_ring import SHM_DIR, owner_alive, owner_of, owner_tag

from tests.pipeline_runs import ROOT, TINY_MODEL_SETS

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system to look into")


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_an_owner_is_alive_only_with_its_pid_running_since_the_time_its_names_say():
    me = owner_of(owner_tag() + "-x-decode-0")
    assert me is not None and me[0] == os.getpid() and owner_alive(*me)
    assert not owner_alive(os.getpid(), me[1] + 1)  # the pid reused by another process
    assert not owner_alive(dead_pid(), None)
    assert owner_of("maskstream-123-abc_defg-decode-0") == (123, None)  # named before start times were
    assert owner_of("maskstream-bench-x") is None and owner_of("msk-test-1-t") is None


def test_only_what_dead_owners_left_is_removed(tmp_path):
    dead, me = dead_pid(), owner_tag()
    dead_tag, reused_tag = f"maskstream-{dead}-1", f"maskstream-{os.getpid()}-1"  # reused: our pid, not our start
    shm = {name: SHM_DIR / name for name in (f"{dead_tag}-abc-decode-0", f"{me}-zzz-decode-0",
                                             f"{reused_tag}-abc-decode-0")}
    owners = {"maskstream-dead": dead_tag, "maskstream-live": me, "maskstream-reused": reused_tag,
              "maskstream-making": None, "other-dead": dead_tag}  # making: its owner file not written yet
    try:
        for path in shm.values():
            path.write_bytes(bytes(4096))
        for name, owner in owners.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "infer").touch()  # an ipc socket's file
            if owner is not None:
                (tmp_path / name / OWNER_FILE).write_text(owner)
        removed = remove_dead_runs(tmp_path)
        # (this host is shared: rings that other dead runs left may go too)
        assert {(f"{dead_tag}-abc-decode-0", 4096), (f"{reused_tag}-abc-decode-0", 4096)} <= set(removed.rings)
        assert all(not owner_alive(*owner_of(name)) for name, _ in removed.rings)
        assert sorted(removed.folders) == [tmp_path / "maskstream-dead", tmp_path / "maskstream-reused"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["maskstream-live", "maskstream-making", "other-dead"]
        assert not shm[f"{dead_tag}-abc-decode-0"].exists() and shm[f"{me}-zzz-decode-0"].exists()
        mine = Leftovers(tuple(r for r in removed.rings if r[0] in shm), removed.folders, removed.owners)
        pids = ", ".join(map(str, sorted((dead, os.getpid()))))
        assert mine.describe() == f"2 shared-memory ring(s) (0.0 MB) and 2 socket folder(s) of dead run(s) (pid {pids})"
        assert not remove_dead_runs(tmp_path)  # nothing left to remove
    finally:
        for path in shm.values():
            path.unlink(missing_ok=True)


def test_a_run_folder_names_its_owner_and_plan_refuses_socket_paths_too_long_for_ipc(tmp_path):
    folder = run_folder(tmp_path)
    assert folder.parent == tmp_path and (folder / OWNER_FILE).read_text() == owner_tag()
    deep = tmp_path / ("d" * (IPC_PATH_MAX - len(str(tmp_path))))
    deep.mkdir()
    cfg = RunConfig(sources=("a.mp4",), transport=TransportOptions(endpoint_dir=deep))
    with pytest.raises(ValueError, match=r"transport.endpoint_dir: the socket path .* is longer than the 107 bytes"):
        plan(cfg)
    assert list(deep.iterdir()) == []  # its folder went with the refusal
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(owner_tag())]
    # A --publish ipc:// path too long: refused while planning too, not a publish stage restarted
    # until the budget ends (exit 3 after four lives).
    short = tmp_path / "s"
    short.mkdir()
    publish = f"ipc://{deep}/{'p' * 8}"
    cfg = RunConfig(sources=("a.mp4",), transport=TransportOptions(endpoint_dir=short),
                    outputs=OutputOptions(publish=publish))
    with pytest.raises(ValueError, match=r"outputs.publish \(--publish\): the socket path .* is longer than the 107"):
        plan(cfg)
    assert list(short.iterdir()) == []


def run(args: list[str], tmp_path: Path, temp: Path) -> subprocess.Popen[str]:
    sets = [x for s in TINY_MODEL_SETS for x in ("--set", s)]
    cmd = [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--out-dir", str(tmp_path / "out"),
           *sets, *args]
    # The default endpoint folder, the system's temporary one, made the test's own through TMPDIR.
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)}, start_new_session=True)


def test_after_kill_9_of_the_whole_group_the_next_run_leaves_shm_and_temp_as_they_were(tmp_path):
    temp = tmp_path / "t"  # short: the ipc socket paths inside must stay within IPC_PATH_MAX
    temp.mkdir()
    long = write_test_clip(tmp_path / "long.mp4", frames=400, size=(160, 120))
    short = write_test_clip(tmp_path / "short.mp4", frames=6, size=(160, 120))
    out = tmp_path / "r.jsonl"
    shm_before, temp_before = set(os.listdir(SHM_DIR)), set(os.listdir(temp))

    first = run(["--source", str(long), "--out", str(out)], tmp_path, temp)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 2):  # every stage up, frames flowing
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 -- -PGID: supervisor, stages and resource tracker
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    left_rings = [n for n in os.listdir(SHM_DIR) if n.startswith(f"maskstream-{first.pid}-")]
    owner_files = [p / OWNER_FILE for p in temp.iterdir() if (p / OWNER_FILE).exists()]
    left_folders = [f.parent for f in owner_files if f.read_text().startswith(f"maskstream-{first.pid}-")]
    assert len(left_rings) == 2 and len(left_folders) == 1  # decode's and preprocess's rings, the sockets

    second = run(["--source", str(short), "--out", str(tmp_path / "r2.jsonl")], tmp_path, temp)
    stdout, stderr = second.communicate(timeout=240)
    assert second.returncode == 0, stderr
    # (other dead runs' rings on this shared host may go too: at least the first run's two)
    note = re.search(r"INFO maskstream\.run: removed (\d+) shared-memory ring\(s\) \([\d.]+ MB\) and 1 socket "
                     r"folder\(s\) of dead run\(s\) \(pid ([\d, ]+)\)", stderr)
    assert note is not None and int(note.group(1)) >= 2 and str(first.pid) in note.group(2).split(", "), stderr

    # torch's own compile cache (TORCHINDUCTOR_CACHE_DIR's default), which torch makes in the temporary
    # folder on first use and keeps on purpose for every later torch program of this user: on a machine
    # that ever ran torch it is there before any run. Nothing else may be new.
    assert set(os.listdir(temp)) - {f"torchinductor_{getpass.getuser()}"} == temp_before
    ours = (f"maskstream-{first.pid}-", f"maskstream-{second.pid}-")
    appeared = set(os.listdir(SHM_DIR)) - shm_before
    assert not [n for n in appeared if n.startswith(ours)]
    # Anything else new in /dev/shm belongs to another process still running (this host is shared).
    others = [n for n in appeared if (owner := owner_of(n)) is None or not owner_alive(*owner)]
    assert not others, f"new in {SHM_DIR} and not owned by a live process: {others}"


def test_doctor_removes_what_dead_runs_left(tmp_path):
    dead = f"maskstream-{dead_pid()}-1"
    ring = SHM_DIR / f"{dead}-abc-decode-0"
    folder = tmp_path / "maskstream-abc"
    folder.mkdir()
    (folder / OWNER_FILE).write_text(dead)
    try:
        ring.write_bytes(bytes(2_000_000))
        done = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", "doctor", "--endpoint-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
    finally:
        ring.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("leftovers")]
    assert re.search(r"removed \d+ shared-memory ring\(s\) \([\d.]+ MB\) and 1 socket folder\(s\)", line), line
    assert not folder.exists() and not ring.exists()

"""Output handling: the lock, staging, publishing and children that die with the converter.
Pure Python (no TensorFlow); processes are real ones, started and killed by their PIDs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conversion import publish

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD_LOCK = """
import sys, time
from conversion import publish
with publish.OutputLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""

STAGE_AND_WAIT = """
import os, sys, time
from conversion import publish
with publish.OutputLock(sys.argv[1]):
    with publish.staging_dir(sys.argv[1]) as staging:
        open(os.path.join(staging, "config.json"), "w").close()
        print(staging, flush=True)
        time.sleep(60)
"""

PARENT_OF_SLEEPER = """
import subprocess, sys, time
from conversion import processes
extra = {"preexec_fn": processes.die_with_parent} if sys.argv[1] == "die_with_parent" else {}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **extra)
print(child.pid, flush=True)
time.sleep(60)
"""


def _python(script, *args):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def _stage(staging, files):
    for rel, content in files.items():
        path = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)


def _read(path):
    with open(path) as f:
        return f.read()


def _tree(folder):
    """{relative path: content} of every file under folder."""
    return {
        os.path.relpath(os.path.join(d, f), folder): _read(os.path.join(d, f))
        for d, _, files in os.walk(folder)
        for f in files
    }


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def output(tmp_path):
    """An output folder whose lock this test holds."""
    path = str(tmp_path / "models" / "bit")
    with publish.OutputLock(path):
        yield path


def test_overwrite_replaces_only_what_was_written(output):
    _stage(
        output,
        {
            "config.json": "old",
            "report.json": "old",
            "notes.txt": "mine",
            "tflite/bit_fp32.tflite": "old",
            "tflite/other.tflite": "mine",
            "serving/1/saved_model.pb": "v1",
        },
    )
    with publish.staging_dir(output) as staging:
        _stage(
            staging,
            {
                "config.json": "new",
                "report.json": "new",
                "tflite/bit_fp32.tflite": "new",
                "serving/2/saved_model.pb": "v2",
            },
        )
        publish.publish(
            staging, output, ["config.json", "tflite/bit_fp32.tflite", "serving/2", "report.json"], overwrite=True
        )
    assert _tree(output) == {
        "config.json": "new",
        "report.json": "new",
        "notes.txt": "mine",
        "tflite/bit_fp32.tflite": "new",
        "tflite/other.tflite": "mine",
        "serving/1/saved_model.pb": "v1",
        "serving/2/saved_model.pb": "v2",
    }
    assert sorted(os.listdir(os.path.dirname(output))) == [".bit.tfbit-lock", "bit"]  # no staging left


def test_a_written_folder_replaces_the_old_one_whole(output):
    _stage(output, {"bundle/old.bin": "old", "keep.txt": "mine"})
    with publish.staging_dir(output) as staging:
        _stage(staging, {"bundle/new.bin": "new"})
        publish.publish(staging, output, ["bundle"], overwrite=True)
    assert _tree(output) == {"bundle/new.bin": "new", "keep.txt": "mine"}
    assert sorted(os.listdir(output)) == ["bundle", "keep.txt"]  # the old folder, moved aside, is gone


def test_a_mount_point_output_keeps_lock_and_staging_inside(tmp_path, monkeypatch):
    # Its parent is another filesystem (no atomic rename from there), maybe read-only.
    output = str(tmp_path / "volume")
    os.makedirs(output)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: path == output or real_ismount(path))
    with publish.OutputLock(output):
        with publish.staging_dir(output) as staging:
            assert os.path.dirname(staging) == output
            assert sorted(os.listdir(output)) == [os.path.basename(staging), ".volume.tfbit-lock"]
            _stage(staging, {"config.json": "new"})
            publish.publish(staging, output, ["config.json"])
    assert os.listdir(tmp_path) == ["volume"]
    assert os.listdir(output) == ["config.json"]


def test_collision_without_overwrite_is_refused_before_anything_moves(output):
    _stage(output, {"config.json": "old", "report.json": "old"})
    with publish.staging_dir(output) as staging:
        _stage(staging, {"bit.keras": "new", "config.json": "new", "report.json": "new"})
        with pytest.raises(publish.ArtifactCollision) as refused:
            publish.publish(staging, output, ["bit.keras", "config.json", "report.json"])
        assert sorted(_tree(staging)) == ["bit.keras", "config.json", "report.json"]
    message = str(refused.value)
    assert "config.json" in message and "report.json" in message and "--overwrite" in message
    assert "bit.keras" not in message
    assert _tree(output) == {"config.json": "old", "report.json": "old"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_source_checkpoint_files_are_never_replaced(output, tmp_path, overwrite):
    source = {"config.json": "source config", "model.safetensors": "weights", "preprocessor_config.json": "p"}
    _stage(output, source)
    alias = tmp_path / "alias"  # the same folder under another name
    alias.symlink_to(output)
    source_paths = [str(alias / name) for name in source]
    with publish.staging_dir(output) as staging:
        _stage(staging, {"config.json": "new", "bit.keras": "new"})
        with pytest.raises(publish.SourceCollision, match="config.json.*choose another --output"):
            publish.publish(
                staging, output, ["bit.keras", "config.json"], source_paths=source_paths, overwrite=overwrite
            )
        # Artifacts that are not the source's own files can go next to it.
        publish.publish(staging, output, ["bit.keras"], source_paths=source_paths, overwrite=overwrite)
    assert _tree(output) == {**source, "bit.keras": "new"}


def test_second_conversion_of_an_output_is_refused_with_the_holders_pid(tmp_path):
    output = str(tmp_path / "bit")
    holder = _python(HOLD_LOCK, output)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(publish.OutputLocked) as refused:
            publish.OutputLock(output).acquire()
        assert refused.value.pid == holder.pid
        assert f"PID {holder.pid}" in str(refused.value) and output in str(refused.value)
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the flock
        holder.wait()
    finally:
        _stop(holder)
    with publish.OutputLock(output):
        with pytest.raises(publish.OutputLocked, match=f"PID {os.getpid()}"):  # in one process too
            publish.OutputLock(output).acquire()
    assert os.listdir(tmp_path) == []  # the lock file goes with the lock


def test_staging_and_publishing_need_the_lock(tmp_path):
    output = str(tmp_path / "bit")
    with pytest.raises(RuntimeError, match="OutputLock"):
        with publish.staging_dir(output):
            pass
    with pytest.raises(RuntimeError, match="OutputLock"):
        publish.publish(str(tmp_path), output, [])


def test_stale_staging_of_dead_processes_is_removed_and_nothing_else(output):
    parent = os.path.dirname(output)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = _dead_pid()
        stale = [f".bit.partial-{dead}", f"bit.partial-{dead}"]  # the second: tfbit before publish.py
        kept = [
            f".bit.partial-{sleeper.pid}",
            f".bit.partial-{dead}x",
            f".bit.old-{dead}",
            f".other.partial-{dead}",
            f"bit.old-{dead}",
        ]
        for name in stale + kept:
            _stage(os.path.join(parent, name), {"saved_model.pb": "x"})
        with publish.staging_dir(output) as staging:
            assert sorted(os.listdir(parent)) == sorted([*kept, os.path.basename(staging), ".bit.tfbit-lock"])
        assert sorted(os.listdir(parent)) == sorted([*kept, ".bit.tfbit-lock"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_during_a_staged_conversion_leaves_no_staging(tmp_path):
    output = str(tmp_path / "bit")
    proc = _python(STAGE_AND_WAIT, output)
    try:
        staging = proc.stdout.readline().strip()
        assert os.path.isfile(os.path.join(staging, "config.json"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        _stop(proc)
    assert os.listdir(tmp_path) == []  # no staging, no lock file, no output


def test_serving_versions_increase_and_are_never_reused(output):
    assert publish.next_serving_version(output) == 1
    versions = []
    for content in ("first", "second"):
        version = publish.next_serving_version(output)
        with publish.staging_dir(output) as staging:
            _stage(staging, {f"serving/{version}/saved_model.pb": content, "config.json": content})
            publish.publish(staging, output, ["config.json", f"serving/{version}"], overwrite=True)
        versions.append(version)
    assert versions == [1, 2]
    assert _tree(os.path.join(output, "serving")) == {"1/saved_model.pb": "first", "2/saved_model.pb": "second"}
    os.makedirs(os.path.join(output, "serving", "variables_backup"))  # not a version: ignored
    assert publish.next_serving_version(output) == 3
    for taken in (2, 1):  # an existing version, or one below the newest, even with overwrite
        with publish.staging_dir(output) as staging:
            _stage(staging, {f"serving/{taken}/saved_model.pb": "third"})
            with pytest.raises(publish.OutputError, match="never replaced"):
                publish.publish(staging, output, [f"serving/{taken}"], overwrite=True)
    assert _tree(os.path.join(output, "serving")) == {"1/saved_model.pb": "first", "2/saved_model.pb": "second"}


def test_report_goes_last_and_an_old_report_first(output, monkeypatch):
    _stage(output, {"report.json": "old", "config.json": "old"})
    events = []
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst):
        events.append(os.path.relpath(dst, output))
        real_replace(src, dst)

    def unlink(path):
        events.append(f"rm {os.path.relpath(path, output)}")
        real_unlink(path)

    with publish.staging_dir(output) as staging:
        _stage(staging, {"report.json": "new", "config.json": "new", "bit.keras": "new"})
        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", replace)
            patched.setattr(os, "unlink", unlink)
            publish.publish(staging, output, ["report.json", "config.json", "bit.keras"], overwrite=True)
    assert events == ["rm report.json", "config.json", "bit.keras", "report.json"]
    assert _tree(output) == {"report.json": "new", "config.json": "new", "bit.keras": "new"}


@pytest.mark.parametrize(
    "written",
    [["../escape"], ["/abs"], ["serving"], ["serving/1/variables"], ["tflite", "tflite/a.tflite"], ["a", "./a"]],
)
def test_artifact_paths_must_be_whole_artifacts_inside_staging(output, written):
    with publish.staging_dir(output) as staging:
        with pytest.raises(ValueError):
            publish.publish(staging, output, written)


def _running(pid):
    """False once the process has exited, even while it waits, a zombie, to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
@pytest.mark.parametrize("how", ["die_with_parent", "plain"])
def test_child_dies_with_its_parent_even_on_kill_9(how):
    parent = _python(PARENT_OF_SLEEPER, how)
    child = int(parent.stdout.readline())
    try:
        assert _running(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + (10 if how == "die_with_parent" else 1)
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        # "plain" shows what the helper prevents (and that this test would notice it).
        assert _running(child) == (how == "plain")
    finally:
        _stop(parent)
        if _running(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_a_child_whose_parent_is_already_gone_kills_itself():
    script = "from conversion import processes; processes.die_with_parent(parent_pid=1); print('alive')"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "alive" not in done.stdout


def test_termination_during_a_critical_section_is_delivered_after_it():
    script = """
import os, signal
from conversion import processes
with processes.termination_as_exit():
    with processes.deferred_termination():
        os.kill(os.getpid(), signal.SIGTERM)
        print("finished the critical section", flush=True)
    print("not reached", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stdout.splitlines() == ["finished the critical section"]


def test_overwrite_never_replaces_a_users_folder_with_a_file(output):
    """A folder named like an artifact (report.json/) is the user's: refused before the export
    and at publishing, with --overwrite too, and nothing moves."""
    _stage(output, {"report.json/notes.txt": "mine", "config.json": "old"})
    written = ["config.json", "report.json"]
    message = r"has folders where tfbit writes files: report.json; tfbit never replaces a folder"
    with pytest.raises(publish.OutputError, match=message):
        publish.check_output(output, written, overwrite=True)
    with publish.staging_dir(output) as staging:
        _stage(staging, {"config.json": "new", "report.json": "new"})
        with pytest.raises(publish.OutputError, match=message):
            publish.publish(staging, output, written, overwrite=True)
    assert _tree(output) == {"report.json/notes.txt": "mine", "config.json": "old"}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, None)])
def test_a_signal_whose_exception_is_swallowed_still_stops_publishing(signum, code, tmp_path):
    """The handler's exception raised inside a `__del__` (or a gc callback, as TensorFlow's
    during a TFLite conversion) is printed as "Exception ignored" and lost: publish raises it
    again instead of moving the new files in."""
    script = f"""
import gc, os, signal, sys, time
from conversion import processes, publish
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ours inherited
output = sys.argv[1]
class Swallows:
    def __del__(self):
        os.kill(os.getpid(), {int(signum)})
        time.sleep(0.5)  # the handler runs here, and its exception is ignored
with processes.termination_as_exit():
    with publish.OutputLock(output), publish.staging_dir(output) as staging:
        open(os.path.join(staging, "config.json"), "w").close()
        Swallows(); gc.collect()
        print("went on", flush=True)
        publish.publish(staging, output, ["config.json"])
        print("published", flush=True)
"""
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", script, str(output)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "Exception ignored" in done.stderr  # the first exception was indeed lost
    assert done.stdout.splitlines() == ["went on"]
    assert done.returncode == (code or -signal.SIGINT)  # Python ends an uncaught KeyboardInterrupt by SIGINT
    assert not output.exists() and os.listdir(tmp_path) == []  # no staging folder, no lock file left

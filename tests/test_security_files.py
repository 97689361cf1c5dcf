"""Issue 17, "cache" and "files in shared temp dirs": each test replays one attack
from the adversarial run (docs/security.md) and asserts the clear error or the
rebuild, and that nothing was overwritten, executed or lost.

Another user is simulated with ``os.chown`` to an unused uid (the tests run as
root; those tests skip otherwise). A "planted" library is a real shared object
whose constructor creates a marker file: if it were ever loaded the marker
would exist. Victims run in fresh interpreters (``run_python``) with their own
cache, XDG and temp directories under ``tmp_path``.
"""

import hashlib
import os
import stat
import subprocess
import textwrap
import time

import pytest

from conftest import run_python
from torch_mps_ext import _private_files
from torch_mps_ext.shader import _compiler

OTHER_UID = 4242  # a user that owns nothing on this machine
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="simulating another user's files needs root (os.chown)")

SRC = "kernel void sec_fill(device float* o, uint i [[thread_position_in_grid]]) { o[i] = 7.0f; }"

VICTIM = f"""
import os, warnings
warnings.simplefilter("always")
import torch, torch_mps_ext
from torch_mps_ext import shader
lib = torch.mps_ext.compile_shader({SRC!r})
out = torch.zeros(4, device="mps_ext")
lib.sec_fill(out)
torch.mps_ext.synchronize()
assert out.cpu().tolist() == [7.0] * 4, out
print("compiler_runs", shader.stats["compiler_runs"], "cache_hits", shader.stats["cache_hits"])
print("library", shader.library_path(lib))
"""

PLANTED_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
  const char* marker = getenv("PLANTED_MARKER");
  int fd = open(marker ? marker : "/tmp/torch_mps_ext_planted_library_ran", O_CREAT | O_WRONLY, 0644);
  if (fd >= 0) close(fd);
}
"""


@pytest.fixture(scope="session")
def planted_library(tmp_path_factory):
    """Bytes of a shared object that creates $PLANTED_MARKER when loaded."""
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(PLANTED_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")],
                   check=True, capture_output=True)
    return (d / "planted.so").read_bytes()


@pytest.fixture
def victim(tmp_path):
    """Runs VICTIM (or other code) with its own cache and a marker path; returns the process."""
    marker = tmp_path / "PLANTED_LIBRARY_RAN"

    def run(code=VICTIM, cache=None, xdg=None, check=True, umask=None, **env):
        full = {"PLANTED_MARKER": str(marker),
                "TORCH_MPS_EXT_SHADER_CACHE": str(cache) if cache is not None else None,
                "XDG_CACHE_HOME": str(xdg if xdg is not None else tmp_path / "xdg"), **env}
        if umask is not None:
            code = f"import os; os.umask({umask:#o})\n" + textwrap.dedent(code)
        return run_python(code, env=full, check=check)

    run.marker = marker
    return run


def compile_in_victim(victim, tmp_path, source, **env):
    """compile_shader(source) in VICTIM's place, with its own cache and no
    ccache; a RuntimeError is printed as `<type> <text>`."""
    return victim(code=f"""
        import torch, torch_mps_ext
        try:
            torch.mps_ext.compile_shader({source!r})
        except RuntimeError as e:
            print(type(e).__name__, e)
        """, cache=tmp_path / "cache", TORCH_MPS_EXT_SHADER_CCACHE="0", **env)


def key(source=SRC):
    return _compiler.library_key(source, False)


def plant_entry(directory, data, with_digest=True, digest=None):
    """Plants `data` as the cache entry of SRC (with a matching digest file by default)."""
    name = f"{key()}.so"
    (directory / name).write_bytes(data)
    if with_digest:
        digest = digest or hashlib.sha256(data).hexdigest()
        (directory / (name + ".sha256")).write_text(f"{digest}  {name}\n")
    return directory / name


def snapshot(directory):
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p)
                     if p.is_symlink() else None) for p in directory.iterdir()}


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# ----------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("default_location", [True, False], ids=["default", "configured"])
def test_umask_000_cache_is_private(victim, tmp_path, default_location):
    # Finding: created with the process umask (0755/0644; under umask 000 everything was 0777).
    if default_location:
        cache, xdg = None, tmp_path / "xdg"
        created = [xdg, xdg / "torch_mps_ext", xdg / "torch_mps_ext" / "shaders"]
    else:
        cache, xdg = tmp_path / "a" / "b" / "shaders", None
        created = [tmp_path / "a", tmp_path / "a" / "b", cache]
    victim(cache=cache, xdg=xdg, umask=0)
    for d in created:
        assert mode(d) == 0o700, d
    files = list(created[-1].iterdir())
    assert {p.suffix for p in files} == {".so", ".sha256", ".cpp", ".frames"}, files  # no temp or build leftovers
    for p in files:
        assert stat.S_ISREG(os.lstat(p).st_mode) and mode(p) == 0o600, p


@needs_root
@pytest.mark.parametrize("dir_mode", [0o777, 0o755, 0o700])
@pytest.mark.parametrize("default_location", [True, False], ids=["default", "configured"])
def test_cache_owned_by_another_user_is_refused(victim, tmp_path, planted_library, dir_mode,
                                                default_location):
    # Finding: an existing world-writable cache directory owned by another user was used
    # without a word, and a library planted there under the victim's key ran as the victim.
    xdg = tmp_path / "xdg"
    cache = xdg / "torch_mps_ext" / "shaders" if default_location else tmp_path / "shared-cache"
    cache.mkdir(parents=True)
    plant_entry(cache, planted_library)  # with a matching digest: the attacker controls the folder
    os.chown(cache, OTHER_UID, OTHER_UID)
    os.chmod(cache, dir_mode)
    before = snapshot(cache)
    r = victim(cache=None if default_location else cache, xdg=xdg, check=False)
    assert r.returncode != 0
    assert "InsecureDirectoryError" in r.stderr and "is owned by another user (uid 4242" in r.stderr, r.stderr
    assert "TORCH_MPS_EXT_SHADER_CACHE" in r.stderr  # says what to do
    assert not victim.marker.exists()
    assert snapshot(cache) == before  # nothing written to (or deleted from) their folder


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o1777])
def test_configured_cache_writable_by_others_is_refused(victim, tmp_path, planted_library, dir_mode):
    # A configured cache directory others can write is the user's to fix: refused, untouched.
    cache = tmp_path / "team-cache"
    cache.mkdir()
    plant_entry(cache, planted_library)
    os.chmod(cache, dir_mode)
    before = snapshot(cache)
    r = victim(cache=cache, check=False)
    assert r.returncode != 0
    assert f"is writable by other users (mode {dir_mode:04o})" in r.stderr, r.stderr
    assert not victim.marker.exists()
    assert snapshot(cache) == before and mode(cache) == dir_mode


def test_default_cache_left_world_writable_is_recreated(victim, tmp_path, planted_library):
    # The default cache as an older version left it under umask 000 (0777), with a library
    # (and its digest) planted under the victim's key while it was open: emptied, re-created
    # 0700 with a warning, the library rebuilt; the planted one never runs.
    xdg = tmp_path / "xdg"
    cache = xdg / "torch_mps_ext" / "shaders"
    cache.mkdir(parents=True)
    plant_entry(cache, planted_library)
    os.chmod(cache, 0o777)
    r = victim(xdg=xdg)
    assert "is writable by other users (mode 0777)" in r.stderr and "re-created with mode 0700" in r.stderr
    assert "compiler_runs 1 " in r.stdout
    assert not victim.marker.exists()
    assert mode(cache) == 0o700
    assert (cache / f"{key()}.so").read_bytes() != planted_library


@pytest.mark.parametrize("digest", ["none", "wrong", "garbage"])
def test_planted_library_not_matching_its_digest_is_rebuilt(victim, tmp_path, planted_library, digest):
    # A library under the victim's key without a digest (also: any entry of an older
    # version), or whose stored digest does not match, is rebuilt, never loaded.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if digest == "none":
        plant_entry(cache, planted_library, with_digest=False)
    elif digest == "wrong":
        plant_entry(cache, planted_library, digest=hashlib.sha256(b"something else").hexdigest())
    else:
        plant_entry(cache, planted_library)
        (cache / f"{key()}.so.sha256").write_bytes(b"\0" * 100)
    r = victim(cache=cache)
    assert "compiler_runs 1 " in r.stdout
    assert not victim.marker.exists()
    data = (cache / f"{key()}.so").read_bytes()
    assert (cache / f"{key()}.so.sha256").read_text() == f"{hashlib.sha256(data).hexdigest()}  {key()}.so\n"


@pytest.mark.parametrize("corruption", ["truncated", "zero-filled", "empty", "flipped"])
def test_corrupted_cache_entry_is_rebuilt_not_loaded(victim, tmp_path, monkeypatch, corruption):
    # Finding: a truncated or zero-filled cache entry killed (SIGBUS/SIGSEGV) every later
    # process that compiled the same source.
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CACHE", str(cache))
    _compiler.compile_library(SRC).close()  # the entry, as a first process leaves it
    so = cache / f"{key()}.so"
    good = so.read_bytes()
    bad = {"truncated": good[: len(good) // 2], "zero-filled": bytes(len(good)), "empty": b"",
           "flipped": good[:4096] + bytes([good[4096] ^ 0xFF]) + good[4097:]}[corruption]
    with open(so, "r+b") as f:  # in place, as a crash or a full disk leaves it
        f.truncate(0)
        f.write(bad)
    # load_metallib of the entry's path: a clear error, nothing loaded; then compile_shader
    # of the same source: detected and rebuilt (the process lives on)
    r = victim(code=textwrap.dedent(f"""
        from torch_mps_ext import shader
        try:
            shader.load_metallib({str(so)!r})
        except RuntimeError as e:
            print("refused:", e)
        """) + VICTIM, cache=cache)
    assert "does not match the digest stored beside it" in r.stdout, r.stdout
    assert "compiler_runs 1 " in r.stdout
    stored = (cache / f"{key()}.so.sha256").read_text().split()[0]
    assert hashlib.sha256(so.read_bytes()).hexdigest() == stored


@pytest.mark.parametrize("name", ["{key}.cpp", "{key}.so", "{key}.so.sha256"])
def test_symlink_planted_at_a_cache_name_is_not_followed(victim, tmp_path, name):
    # Finding: a symlink planted at <key>.cpp made the victim overwrite the link's target.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    link = cache / name.format(key=key())
    link.symlink_to(target)
    r = victim(cache=cache)
    assert "compiler_runs 1 " in r.stdout
    assert target.read_text() == "do not overwrite"
    assert not link.is_symlink() and link.is_file()


def test_load_metallib_bytes_never_loads_a_planted_file(victim, tmp_path, planted_library):
    # Finding: load_metallib(bytes) loaded a planted loaded-<sha>.so without checking it.
    genuine_cache = tmp_path / "genuine"
    r = victim(cache=genuine_cache)
    genuine = (genuine_cache / f"{key()}.so").read_bytes()
    sha = hashlib.sha256(genuine).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for planted in ("file", "symlink"):
        name = cache / f"loaded-{sha[:40]}.so"
        name.unlink(missing_ok=True)
        if planted == "file":
            name.write_bytes(planted_library)
        else:
            (tmp_path / "elsewhere.so").write_bytes(planted_library)
            name.symlink_to(tmp_path / "elsewhere.so")
        (genuine_cache / "lib.bytes").write_bytes(genuine)
        r = victim(code=f"""
            import torch, torch_mps_ext
            from torch_mps_ext import shader
            data = open({str(genuine_cache / "lib.bytes")!r}, "rb").read()
            lib = shader.load_metallib(data)
            out = torch.zeros(4, device="mps_ext")
            lib.sec_fill(out)
            torch.mps_ext.synchronize()
            print(out.cpu().tolist())
            """, cache=cache)
        assert "[7.0, 7.0, 7.0, 7.0]" in r.stdout
        assert not victim.marker.exists(), planted
        assert not name.is_symlink() and name.read_bytes() == genuine
        assert planted == "file" or (tmp_path / "elsewhere.so").read_bytes() == planted_library


def test_symlink_at_a_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    # Finding: a symlink planted at load_metallib's temporary name (then the predictable
    # loaded-<sha>.tmp<pid>) made the victim overwrite the link's target. Temporary names
    # are now random and opened O_CREAT|O_EXCL|O_NOFOLLOW: even a correctly guessed name
    # with a link planted at it is skipped, never opened.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    data = b"\x7fELF not really a library"
    sha = hashlib.sha256(data).hexdigest()
    old_style = cache / f"loaded-{sha[:40]}.tmp{os.getpid()}"
    old_style.symlink_to(target)
    guessed = ".planted.tmp"
    (cache / guessed).symlink_to(target)
    names = iter([guessed, guessed, ".fresh-name.tmp"])
    monkeypatch.setattr(_private_files, "_tmp_name", lambda name: next(names))
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CACHE", str(cache))
    from torch_mps_ext import shader
    with pytest.raises(RuntimeError, match="is not a torch_mps_ext shader library"):
        shader.load_metallib(data)
    assert target.read_text() == "do not overwrite"
    assert (cache / guessed).is_symlink() and old_style.is_symlink()
    assert not (cache / f"loaded-{sha[:40]}.so").exists()  # a non-library is not left behind
    assert not (cache / ".fresh-name.tmp").exists()


# ----------------------------------------------------------------------------- the host compiler
def test_compiler_cpu_time_limit(victim, tmp_path):
    # A source whose compilation never ends (constant evaluation of 4e10 steps, within
    # g++'s own limits) is stopped by the CPU-time limit with a clear error.
    src = """
    constexpr long burn() { long s = 0; for (long i = 0; i < 200000; ++i)
      for (long j = 0; j < 200000; ++j) s += i ^ j; return s; }
    kernel void k(device long* o, uint i [[thread_position_in_grid]]) { constexpr long v = burn(); o[i] = v; }
    """
    t0 = time.monotonic()
    r = compile_in_victim(victim, tmp_path, src, TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S="2")
    # on an idle machine the CPU-time limit stops it; on a loaded one (the compiler getting
    # less than half a core) the wall-clock timeout of twice that comes first
    assert "CompilerLimitError" in r.stdout and ("CPU-time limit of 2 s" in r.stdout or
                                                  "within its timeout of 4 s" in r.stdout), r.stdout
    assert "TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S" in r.stdout
    assert time.monotonic() - t0 < 60


def test_compiler_memory_limit(victim, tmp_path):
    r = compile_in_victim(victim, tmp_path, SRC,
                          TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES=str(48 << 20))
    assert "CompilerLimitError" in r.stdout, r.stdout
    assert f"limit of {48 << 20} bytes (TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES)" in r.stdout


def test_compiler_timeout_kills_the_whole_process_group(victim, tmp_path):
    # A compiler that blocks (here: a stand-in that sleeps, with a child of its own) is
    # killed at the wall-clock timeout (twice the CPU limit), children included.
    pids = tmp_path / "pids"
    fake = tmp_path / "fake-cxx"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "fake-cxx 1.0"; exit 0; fi
        sleep 1000 &
        echo $$ $! > {pids}
        wait
        """))
    fake.chmod(0o755)
    t0 = time.monotonic()
    r = compile_in_victim(victim, tmp_path, SRC, CXX=str(fake),
                          TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S="1")
    assert "CompilerLimitError" in r.stdout and "timeout of 2 s" in r.stdout, r.stdout
    assert time.monotonic() - t0 < 60
    for pid in map(int, pids.read_text().split()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"compiler process {pid} still running"


def test_compile_error_is_still_a_syntax_error(victim, tmp_path):
    r = victim(code="""
        import torch, torch_mps_ext
        try:
            torch.mps_ext.compile_shader("kernel void k(device float* o) { o[0] = nope; }")
        except SyntaxError as e:
            print("SyntaxError", e.lineno)
        """, cache=tmp_path / "cache")
    assert "SyntaxError 1" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- profiler files
PROFILE = """
import warnings
warnings.simplefilter("always")
import torch, torch_mps_ext
from torch_mps_ext import profiler
profiler.start()
torch.ones(2, device="mps_ext")
print("TRACE", profiler.stop())
"""


def trace_path(r):
    return [ln.split(None, 1)[1] for ln in r.stdout.splitlines() if ln.startswith("TRACE ")][0]


@needs_root
def test_foreign_trace_folder_in_shared_tmp_is_not_used(victim, tmp_path):
    # Finding: the default trace folder in a shared TMPDIR was used when owned by another
    # user and 0777. Both the old shared name and the per-user one are planted.
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    planted = [shared / "torch_mps_ext_traces", shared / f"torch_mps_ext_traces-{os.geteuid()}"]
    for d in planted:
        d.mkdir()
        os.chown(d, OTHER_UID, OTHER_UID)
        os.chmod(d, 0o777)
    r = victim(code=PROFILE, TMPDIR=str(shared), PYTORCH_MPS_EXT_TRACE_FILE=None)
    path = trace_path(r)
    assert "is owned by another user (uid 4242" in r.stderr, r.stderr
    assert not any(path.startswith(str(d) + os.sep) for d in planted)
    assert path.startswith(str(shared) + os.sep)
    folder = os.path.dirname(path)
    assert os.stat(folder).st_uid == os.geteuid() and mode(folder) == 0o700
    assert mode(path) == 0o600
    for d in planted:
        assert list(d.iterdir()) == []


def test_symlink_at_trace_folder_is_not_followed(victim, tmp_path):
    # A symbolic link planted at the per-user folder's name (pointing into a folder of the
    # victim's, say) is not followed: the trace goes to a fresh private folder.
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    elsewhere = tmp_path / "victims-folder"
    elsewhere.mkdir(mode=0o700)
    (shared / f"torch_mps_ext_traces-{os.geteuid()}").symlink_to(elsewhere)
    r = victim(code=PROFILE, TMPDIR=str(shared), PYTORCH_MPS_EXT_TRACE_FILE=None)
    assert "is a symbolic link" in r.stderr, r.stderr
    assert list(elsewhere.iterdir()) == []
    assert mode(os.path.dirname(trace_path(r))) == 0o700


def test_own_trace_folder_left_open_is_made_private(victim, tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    folder = shared / f"torch_mps_ext_traces-{os.geteuid()}"
    folder.mkdir()
    os.chmod(folder, 0o777)
    (folder / "old-trace.json").write_text("{}")
    r = victim(code=PROFILE, TMPDIR=str(shared), PYTORCH_MPS_EXT_TRACE_FILE=None, umask=0)
    assert "made private (mode 0700)" in r.stderr, r.stderr
    assert os.path.dirname(trace_path(r)) == str(folder)
    assert mode(folder) == 0o700 and mode(trace_path(r)) == 0o600
    assert (folder / "old-trace.json").read_text() == "{}"  # the user's traces are kept


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_link_planted_at_trace_name_is_not_written_through(victim, tmp_path, link):
    # Finding: a symlink planted at the trace name made stop() overwrite its target.
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    trace = shared / "trace.json"
    if link == "symlink":
        trace.symlink_to(target)
    else:
        os.link(target, trace)
    if os.geteuid() == 0 and link == "symlink":
        os.lchown(trace, OTHER_UID, OTHER_UID)  # another user's link in a sticky folder
    r = victim(code=PROFILE, PYTORCH_MPS_EXT_TRACE_FILE=str(trace))
    assert trace_path(r) == str(trace)
    assert target.read_text() == "do not overwrite"
    assert not trace.is_symlink() and '"traceEvents"' in trace.read_text()


def test_link_planted_at_capture_name_is_not_written_through(victim, tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    capture = shared / "capture.json"
    capture.symlink_to(target)
    victim(code=f"""
        import torch, torch_mps_ext
        from torch_mps_ext import profiler
        with profiler.metal_capture({str(capture)!r}):
            torch.ones(2, device="mps_ext")
        """, MTL_CAPTURE_ENABLED="1")
    assert target.read_text() == "do not overwrite"
    assert not capture.is_symlink() and '"torch_mps_ext.capture"' in capture.read_text()
    assert mode(capture) == 0o600


def test_checkpoint_loaded_without_the_backend(tmp_path):
    # torch.save writes the location "mps_ext:0". Without torch_mps_ext, torch's MPS handler
    # claims every location starting with "mps" and fails with a message naming "mps": that
    # text is torch's, nothing in a checkpoint can change it without breaking
    # weights_only loading (docs/security.md, "Checkpoints"). Pinned here, with the two ways
    # out the docs give: map_location="cpu", or loading with the backend installed.
    ckpt = tmp_path / "model.pt"
    run_python(f"""
        import torch, torch_mps_ext
        torch.save({{"w": torch.arange(4.0, device="mps_ext")}}, {str(ckpt)!r})
    """)
    proc = run_python(f"""
        import sys, torch
        assert "torch_mps_ext" not in sys.modules
        try:
            torch.load({str(ckpt)!r})
        except RuntimeError as e:
            print("ERR", e)
        print("CPU", torch.load({str(ckpt)!r}, map_location="cpu")["w"].tolist())
    """, env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert "ERR torch.UntypedStorage(): Storage device not recognized: mps" in proc.stdout, proc.stdout
    assert "CPU [0.0, 1.0, 2.0, 3.0]" in proc.stdout, proc.stdout
    proc = run_python(f"""
        import torch, torch_mps_ext
        w = torch.load({str(ckpt)!r})["w"]
        print("DEV", w.device, w.cpu().tolist())
    """)
    assert "DEV mps_ext:0 [0.0, 1.0, 2.0, 3.0]" in proc.stdout, proc.stdout

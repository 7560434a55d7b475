"""Outputs: never over an existing path unless forced, the umask's modes, nothing half-written, and
a full disk or an unwritable directory as one line, in the library and through `pdg` itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from portable_dg.errors import ConfigError, OutputError
from portable_dg.outputs import output_directory, output_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_file_refuses_existing_path_unless_forced(tmp_path, umask_022):
    path = tmp_path / "out.bin"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="out.bin: already exists; pass --force to replace it"):
        with output_file(path) as tmp:
            tmp.write_text("new")
    assert path.read_text() == "mine"
    with output_file(path, force=True) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with output_file(tmp_path / "a") as tmp:
            tmp.write_text("x")
        os.umask(0o077)
        with output_file(tmp_path / "b") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_text("mine")
    with pytest.raises(OutputError, match=r"out.bin: cannot write: No space left on device; nothing was written"):
        with output_file(path, force=True) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_an_error_about_another_file_names_it(tmp_path):
    with pytest.raises(OutputError, match=r"^/src/model.safetensors: Input/output error \(while writing .*out.bin"):
        with output_file(tmp_path / "out.bin"):
            raise OSError(5, "Input/output error", "/src/model.safetensors")


def test_refuses_the_source_and_a_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ConfigError, match="refusing to overwrite the source"):
        with output_file(src / "inside.gguf", sources=[src]):
            pass
    with pytest.raises(ConfigError, match="is a directory"):
        with output_file(src):
            pass


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file: File exists \(while writing .*file/out.gguf; nothing was written"):
        with output_file(tmp_path / "file" / "out.gguf"):
            pass


def test_directory_replaces_only_an_empty_one(tmp_path, umask_022):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; choose a new path"):
        with output_directory(taken):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with output_directory(empty) as tmp:
        (tmp / "f").write_text("x")
    assert (empty / "f").read_text() == "x" and empty.stat().st_mode & 0o777 == 0o755
    with pytest.raises(OutputError):
        with output_directory(tmp_path / "new") as tmp:
            (tmp / "f").write_text("x")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="out.gguf: cannot write: Permission denied"):
            with output_file(tmp_path / "out.gguf"):
                pass
    finally:
        tmp_path.chmod(0o755)


def run_with_small_disk(args: list[str], cwd: Path, limit: int = 4096) -> subprocess.CompletedProcess:
    """`pdg ARGS` with every file write past `limit` bytes failing (RLIMIT_FSIZE with SIGXFSZ
    ignored: the write gets EFBIG, as a full disk gives ENOSPC)."""
    import resource

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "portable_dg.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, preexec_fn=small_disk, timeout=120)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
@pytest.mark.parametrize("command", [
    lambda src: ["convert", str(src), "out.gguf", "--to", "gguf", "--quant", "F32"],
    lambda src: ["convert", str(src), "out-mlx", "--to", "mlx", "--quant", "none"],
    lambda src: ["synth", "out-synth", "--like", "tiny"],
    lambda src: ["imatrix", "--model", str(src), "--out", "out.npz", "--n-random", "1", "--steps", "1"],
], ids=["convert-gguf", "convert-mlx", "synth", "imatrix"])
def test_full_disk_is_one_line_and_leaves_nothing(tiny_a, tmp_path, command):
    args = command(tiny_a)
    limit = 1024 if args[0] == "imatrix" else 4096
    result = run_with_small_disk(args, tmp_path, limit)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large; nothing was written" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []

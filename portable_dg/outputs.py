"""Writing outputs the way every `pdg` command does: nothing the user had is lost, nothing half-written
is left behind, and a full disk or an unwritable directory is one line, not a traceback.

* `output_file(path, force=...)` yields a temporary path next to `path`; when the block ends without
  an error the file gets the mode an ordinary new file would get (0666 less the umask) and is renamed
  over `path`.  An existing `path` is refused unless `force`; the source of a conversion never.
* `output_directory(path)` does the same for a directory (0777 less the umask); an existing
  directory is never replaced (an empty one is).
* On an `OSError` inside the block the temporary file or directory is removed and an `OutputError`
  names the output (or the file the error was about) and the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ConfigError, OutputError


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_source(path: Path, sources: Sequence[Path]) -> None:
    """ConfigError if `path` is one of `sources` or lies inside one of them."""
    target = path.resolve()
    for src in sources:
        src = Path(src).resolve()
        if target == src or src in target.parents:
            raise ConfigError(f"{path}: refusing to overwrite the source {src}")


def check_new_file(path: str | os.PathLike, *, force: bool = False, sources: Sequence[Path] = ()) -> Path:
    """`path` as a Path, if a file may be written there; ConfigError naming the problem otherwise."""
    path = Path(path)
    refuse_source(path, sources)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the path of the file to write")
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; pass --force to replace it")
    return path


def check_new_directory(path: str | os.PathLike, *, sources: Sequence[Path] = ()) -> Path:
    """`path` as a Path, if a new directory may be created there (an existing empty one will do)."""
    path = Path(path)
    refuse_source(path, sources)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise ConfigError(f"{path}: already exists; choose a new path (directories are never replaced)")
    return path


def write_error(e: OSError, output: Path) -> OutputError:
    """One line for an OSError met while writing `output`: it names the output, or the other
    file the error was about (a source that could not be read, say)."""
    name = "" if e.filename is None else str(e.filename)
    ours = not name or Path(name) == output or f"/.{output.name}." in f"/{name}"
    reason = e.strerror or str(e) or type(e).__name__
    if ours:
        return OutputError(f"{output}: cannot write: {reason}; nothing was written")
    return OutputError(f"{name}: {reason} (while writing {output}; nothing was written)")


@contextmanager
def output_file(path: str | os.PathLike, *, force: bool = False, sources: Sequence[Path] = (),
                suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file beside `path`; rename it over `path` when the block succeeds."""
    path = check_new_file(path, force=force, sources=sources)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def output_directory(path: str | os.PathLike, *, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; rename it to `path` when the block succeeds."""
    path = check_new_directory(path, sources=sources)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o777 & ~umask())
        yield Path(tmp)
        if path.exists():
            path.rmdir()                                       # the empty directory it replaces
        os.rename(tmp, path)
    except OSError as e:
        raise write_error(e, path) from None
    finally:
        if tmp and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)

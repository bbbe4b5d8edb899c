"""Files that are never seen half-written: every result, metrics file, checkpoint and cache that
qtrain writes goes through :func:`write_bytes_atomic` (a fsynced temporary file, then a rename), so a
crash or a full disk at any moment leaves the previous file as it was. A disk that refuses the write
(full, quota, read-only, permissions) is one :class:`~qtrain.errors.DiskError` naming the folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from qtrain.errors import DiskError

#: errno values that mean "this folder cannot take the file" (full, quota, read-only, too large)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def disk_error(e: OSError, path: Path, needed: int | None = None) -> DiskError:
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
        free_txt = f"; {free / 2**20:.1f} MiB free there"
    except OSError:
        free_txt = ""
    need = f" (the file needs {needed / 2**20:.1f} MiB{free_txt})" if needed else free_txt and f" ({free_txt[2:]})"
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the folder is on a read-only file system", errno.EFBIG: "the file exceeds the size limit",
            }.get(e.errno, "writing there is not permitted")
    return DiskError(f"Could not write {Path(path).name} in {folder}: {what}{need} [{e.strerror}]. Nothing "
                     "written before was lost: the previous checkpoint and metrics are intact and the temporary "
                     "file was removed. Free space (or fix the permissions) and continue with resume=true "
                     f"(or resume={folder.parent if folder.name == 'checkpoints' else folder}).")


def write_bytes_atomic(path: Path, payload: bytes, keep_previous: bool = False) -> None:
    """Write ``payload`` to ``path`` through a fsynced temporary file and a rename; ``keep_previous``:
    the file it replaces becomes :func:`previous_path` (``name.prev.pt``) instead of being removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, path, len(payload)) from None
        raise


def previous_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".prev" + Path(path).suffix)




def write_refused(folder: Path) -> str | None:
    """None when a file can be created in ``folder``, else why not (the disk's words: read-only, no
    permission, full): a probe file is made and removed. Any other failure is raised."""
    probe = Path(folder) / f".qtrain-write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        return e.strerror
    return None


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())

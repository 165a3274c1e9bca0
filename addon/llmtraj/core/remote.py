"""Trajectories in object storage: `llm_traj_path` (and every reader) may be an
fsspec URL (`s3://bucket/prefix`, `gs://…`, `memory://…`) naming a directory of
`<session>.jsonl` files.

The proxy writes locally first, with the same crash safety, to a stage
directory, and `Uploader` puts each session's file (its whole lines) at
`URL/<session>.jsonl`; it remembers what it uploaded, so a file that changed
since, or failed to go up, is found again (`pending`). Readers fetch a URL's
files into a local cache first (`local_trajectory`).

fsspec and the filesystem's package (s3fs for `s3://`: `pip install
'llm-traj[s3]'`) are imported only when a URL is used.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_UPLOADED = ".uploaded.json"  # in the stage directory: file name -> bytes uploaded


class RemoteError(Exception):
    """A URL that cannot be used, in one line."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an fsspec URL of a remote store (file:// is a local path)."""
    m = _URL.match(str(path)) if isinstance(path, str) else None
    return m is not None and m.group(1).lower() != "file"


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"{url}: object storage needs fsspec: pip install 'llm-traj[s3]'") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise RemoteError(f"{url}: {exc}") from None
    return fs, root.rstrip("/")


def check_url(url: str) -> None:
    """That `url` can be used as a trajectory directory (its filesystem is
    installed; it is not a single `.jsonl` file); RemoteError if not."""
    if url.rstrip("/").endswith(".jsonl"):
        raise RemoteError(f"{url}: a URL trajectory is a directory of <session>.jsonl files, not one .jsonl file")
    _filesystem(url)


def default_stage(url: str) -> Path:
    """Where a proxy writing to `url` keeps its files first: one directory per URL in the state directory."""
    state = Path(os.environ.get("LLM_TRAJ_STATE_DIR") or Path.home() / ".llm-traj").expanduser()
    return state / "stage" / hashlib.sha256(url.encode()).hexdigest()[:16]


class Uploader:
    """Puts the stage directory's session files at the URL, whole lines only."""

    def __init__(self, url: str, stage: Path) -> None:
        self.url = url.rstrip("/")
        self.stage = Path(stage)
        self._fs, self._root = _filesystem(url)
        self._uploaded: dict[str, int] = self._read_uploaded()

    def upload(self, session: str) -> int:
        """Upload the session's file as it is now (up to its last whole line):
        the bytes uploaded. Raises OSError (or the filesystem's error) on failure."""
        file = self.stage / f"{session}.jsonl"
        data = file.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # a line being written is not whole yet
        if self._uploaded.get(file.name) == len(data):
            return len(data)
        self._fs.pipe_file(f"{self._root}/{file.name}", data)
        self._uploaded[file.name] = len(data)
        self._write_uploaded()
        return len(data)

    def pending(self) -> list[str]:
        """The sessions whose file holds more than was uploaded (failed, or never tried)."""
        if not self.stage.is_dir():
            return []
        sessions = []
        for name in sorted(os.listdir(self.stage)):
            if name.endswith(".jsonl"):
                size = (self.stage / name).stat().st_size
                if size and self._uploaded.get(name) != size:
                    sessions.append(name[: -len(".jsonl")])
        return sessions

    def _read_uploaded(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads((self.stage / _UPLOADED).read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _write_uploaded(self) -> None:
        self.stage.mkdir(parents=True, exist_ok=True)
        tmp = self.stage / f"{_UPLOADED}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self._uploaded))
        os.replace(tmp, self.stage / _UPLOADED)


def local_trajectory(path: str | os.PathLike) -> Path:
    """A local path to read the trajectory at `path` from: `path` itself, or
    for a URL a fresh local copy of its `.jsonl` files, removed when the
    process exits (RemoteError if it cannot be had)."""
    if not is_url(path):
        return Path(path)
    url = str(path).rstrip("/")
    fs, root = _filesystem(url)
    copy = Path(tempfile.mkdtemp(prefix="llm-traj-remote-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)  # read lazily (a session at a time) until then
    try:
        if root.endswith(".jsonl"):
            target = copy / Path(root).name
            fs.get_file(root, str(target))
            return target
        names = [name for name in fs.ls(root, detail=False) if name.endswith(".jsonl")]
        for name in names:
            fs.get_file(name, str(copy / Path(name).name))
    except FileNotFoundError:
        raise RemoteError(f"{url} does not exist") from None
    except OSError as exc:
        raise RemoteError(f"cannot read {url}: {exc}") from None
    return copy

"""The finetunes registry: a sqlite database file plus adapter files under `data_dir`.

    data_dir/finetunes.sqlite3           records (id, name, model, description, timestamps) + assets
    data_dir/finetunes/<id>/adapter_config.json
    data_dir/finetunes/<id>/adapter_model.safetensors
    data_dir/incoming/                   uploads being received, folders being deleted (emptied at start)

Rules, as on Workers AI: ids are uuids, names are unique, files are `adapter_config.json` and
`adapter_model.safetensors` only and cannot be replaced once uploaded.

Durability: the `assets` table is the truth about which files a finetune has, and a row is committed
only after its file is complete under its real name. An upload is received into `incoming/`
(never under its real name), fsynced, checked (`serving/adapter_files.py`: size, format, dtypes,
finite values; nothing is unpickled), renamed into `finetunes/<id>/` and the directory fsynced; when
it completes the pair the backend loads (and so validates) the adapter; only then is the asset row
committed. Any refusal or error removes the file. So a crash (kill -9, power loss) at any point
leaves either a committed, complete file or debris that no row points to, and `reconcile`, which runs
whenever a store is opened, removes the debris: everything in `incoming/`, folders of no finetune,
files no row names, and rows whose file is missing or of the wrong size (their finetune is then
incomplete: requests with it get 3039 until the file is uploaded again). `reload_all` then loads
every complete finetune. Deletion commits the row's removal first, then moves the folder into
`incoming/` (one rename) and removes it.

Test-only hook: with GEMMA_JAX_TEST_CRASH_AT=<point> the process SIGKILLs itself at that point (see
`CRASH_POINTS`), so tests can kill the server between any two steps above.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from serving.adapter_files import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME, AdapterFileError, check_file
from serving.backend import AdapterError, Backend

log = logging.getLogger("serving.finetunes")

REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
MAX_NAME = 128
MAX_DESCRIPTION = 4096
_COPY_CHUNK = 1 << 20

CRASH_ENV = "GEMMA_JAX_TEST_CRASH_AT"
CRASH_POINTS = (
    "finetune-row-written",  # create: row inserted, transaction not committed
    "upload-partial",        # first chunk of an upload written to incoming/, not complete
    "upload-written",        # upload complete and fsynced in incoming/, not checked or moved
    "asset-renamed",         # file under its real name in finetunes/<id>/, no row yet
    "asset-row-written",     # asset row inserted, transaction not committed
    "asset-committed",       # row committed, response not sent
    "delete-committed",      # finetune row deleted, folder still in place
    "delete-moved",          # folder moved into incoming/, not removed yet
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS finetunes (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, model TEXT NOT NULL, description TEXT NOT NULL,
  created_at TEXT NOT NULL, modified_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assets (
  finetune_id TEXT NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE, file_name TEXT NOT NULL,
  size INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (finetune_id, file_name));
"""


def crash_point(name: str) -> None:
    """Test-only: SIGKILL this process here if GEMMA_JAX_TEST_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.write(2, f"gemma-jax test crash point {name}: SIGKILL pid {os.getpid()}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


class FinetuneError(ValueError):
    """A request the registry refuses (duplicate name, bad file name, overwrite, bad file)."""


class FinetuneNotFound(KeyError):
    pass


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, link or folder (never following a link out of the data dir)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, TypeError, AttributeError):
        return False


class FinetuneStore:
    def __init__(self, data_dir: str | os.PathLike, model: str):
        self.root = Path(data_dir)
        self.files_dir = self.root / "finetunes"
        self.incoming = self.root / "incoming"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "finetunes.sqlite3"
        self.model = model
        self._lock = threading.RLock()  # one writer at a time (check-then-write must be atomic)
        with self._db() as db:
            db.executescript(_SCHEMA)
        self.reconcile()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")
        try:
            with db:  # commit on success, roll back on error
                yield db
        finally:
            db.close()

    # -- records ------------------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> dict[str, Any]:
        return {k: row[k] for k in ("id", "name", "description", "model", "created_at", "modified_at")}

    def create(self, name: Any, description: Any = None) -> dict[str, Any]:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise FinetuneError(f"name must be a non-empty string of at most {MAX_NAME} characters")
        if "/" in name or name != name.strip():
            raise FinetuneError("name must not contain '/' or leading/trailing spaces")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise FinetuneError("name must not contain control characters")
        if description is None:
            description = ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise FinetuneError(f"description must be a string of at most {MAX_DESCRIPTION} characters")
        stamp = now_iso()
        record = {"id": str(uuid.uuid4()), "name": name, "description": description, "model": self.model,
                  "created_at": stamp, "modified_at": stamp}
        with self._lock, self._db() as db:
            try:
                db.execute("INSERT INTO finetunes VALUES (:id, :name, :model, :description, :created_at,"
                           " :modified_at)", record)
            except sqlite3.IntegrityError:
                raise FinetuneError(f"a finetune named {name!r} already exists") from None
            crash_point("finetune-row-written")
        self.directory(record["id"]).mkdir(parents=True, exist_ok=True)
        return record

    def get(self, finetune_id: str) -> dict[str, Any]:
        with self._db() as db:
            row = db.execute("SELECT * FROM finetunes WHERE id = ?", (finetune_id,)).fetchone()
        if row is None:
            raise FinetuneNotFound(finetune_id)
        return self._record(row)

    def find(self, id_or_name: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM finetunes WHERE id = ? OR name = ? ORDER BY id = ? DESC",
                             (id_or_name, id_or_name, id_or_name)).fetchone()
        return None if row is None else self._record(row)

    def list(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM finetunes ORDER BY created_at, id").fetchall()
        return [self._record(r) for r in rows]

    def files(self, finetune_id: str) -> list[str]:
        """The files of a finetune that are complete on disk (committed rows only)."""
        with self._db() as db:
            rows = db.execute("SELECT file_name FROM assets WHERE finetune_id = ? ORDER BY file_name",
                              (finetune_id,)).fetchall()
        return [r["file_name"] for r in rows]

    def complete(self, finetune_id: str) -> bool:
        return set(REQUIRED_FILES) <= set(self.files(finetune_id))

    def directory(self, finetune_id: str) -> Path:
        """data_dir/finetunes/<id>; only a canonical uuid names a folder (no path ever comes from a client)."""
        if not _is_uuid(finetune_id):
            raise FinetuneNotFound(finetune_id)
        return self.files_dir / finetune_id

    # -- files --------------------------------------------------------------------------------
    def add_asset(self, finetune_id: str, file_name: Any, stream: IO[bytes], backend: Backend,
                  max_bytes: int) -> dict[str, Any]:
        """Receive, check and store one file; when both are present, load the adapter into the backend.
        The asset row is committed last: until then the file is not listed and not used."""
        if not isinstance(file_name, str) or file_name not in REQUIRED_FILES:
            raise FinetuneError(f"file_name must be one of {', '.join(REQUIRED_FILES)}, got {file_name!r}")
        limit = min(max_bytes, MAX_CONFIG_BYTES) if file_name == CONFIG_NAME else max_bytes
        with self._lock:
            record = self.get(finetune_id)
            if file_name in self.files(finetune_id):
                raise FinetuneError(f"{file_name} was already uploaded to finetune {finetune_id}; "
                                    "files cannot be replaced")
            folder = self.directory(finetune_id)
            target = folder / file_name
            tmp, size = self._receive(stream, file_name, limit)
            try:
                crash_point("upload-written")
                check_file(file_name, tmp)
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                _fsync_dir(folder)
            except AdapterFileError as e:
                tmp.unlink(missing_ok=True)
                raise FinetuneError(str(e)) from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            crash_point("asset-renamed")
            present = set(self.files(finetune_id)) | {file_name}
            loaded = False
            try:
                if set(REQUIRED_FILES) <= present:
                    backend.load_adapter(finetune_id, record["name"], folder)
                    loaded = True
                stamp = now_iso()
                with self._db() as db:
                    db.execute("INSERT INTO assets VALUES (?, ?, ?, ?)", (finetune_id, file_name, size, stamp))
                    db.execute("UPDATE finetunes SET modified_at = ? WHERE id = ?", (stamp, finetune_id))
                    crash_point("asset-row-written")
            except BaseException:
                if loaded:
                    backend.remove_adapter(finetune_id)
                target.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    _fsync_dir(folder)
                raise
            crash_point("asset-committed")
            return {**record, "modified_at": stamp, "files": sorted(present)}

    def _receive(self, stream: IO[bytes], file_name: str, limit: int) -> tuple[Path, int]:
        """Copy `stream` into a new file in incoming/ (at most `limit` bytes), fsynced; (path, size)."""
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=f".{file_name}.part", dir=self.incoming)
        tmp, size = Path(name), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_COPY_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise FinetuneError(f"{file_name} is larger than the limit of {limit} bytes")
                    out.write(chunk)
                    if size == len(chunk):
                        out.flush()
                        crash_point("upload-partial")
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, size

    def delete(self, finetune_id: str, backend: Backend) -> dict[str, Any]:
        with self._lock:
            record = self.get(finetune_id)
            backend.remove_adapter(finetune_id)
            with self._db() as db:
                db.execute("DELETE FROM finetunes WHERE id = ?", (finetune_id,))
            crash_point("delete-committed")
            folder = self.directory(finetune_id)
            if folder.exists():  # rename first: the id's folder disappears atomically
                trash = self.incoming / f"deleted-{finetune_id}-{uuid.uuid4().hex[:8]}"
                os.replace(folder, trash)
                _fsync_dir(self.files_dir)
                crash_point("delete-moved")
                shutil.rmtree(trash, ignore_errors=True)
        return record

    # -- startup ------------------------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """Make the files and the rows agree after whatever stopped the last process (see the module
        docstring). Returns how many unfinished uploads, orphan files/folders and rows were removed."""
        removed = {"unfinished": 0, "orphans": 0, "rows": 0}
        with self._lock:
            for entry in self.incoming.iterdir():
                _remove(entry)
                removed["unfinished"] += 1
            with self._db() as db:
                ids = {r["id"] for r in db.execute("SELECT id FROM finetunes")}
                assets: dict[str, dict[str, int]] = {}
                for r in db.execute("SELECT finetune_id, file_name, size FROM assets"):
                    assets.setdefault(r["finetune_id"], {})[r["file_name"]] = r["size"]
                for entry in self.files_dir.iterdir():
                    if entry.name not in ids or entry.is_symlink() or not entry.is_dir():
                        _remove(entry)
                        removed["orphans"] += 1
                for finetune_id in ids:
                    if not _is_uuid(finetune_id):  # not ours (an edited database): never a path
                        continue
                    folder = self.files_dir / finetune_id
                    registered = assets.get(finetune_id, {})
                    if folder.is_dir():
                        for entry in folder.iterdir():
                            if entry.name not in registered or entry.is_symlink() or not entry.is_file():
                                _remove(entry)
                                removed["orphans"] += 1
                    for file_name, size in registered.items():
                        path = folder / file_name
                        if path.is_file() and not path.is_symlink() and path.stat().st_size == size:
                            continue
                        log.error("finetune %s: %s is missing or incomplete on disk; dropped, upload it again",
                                  finetune_id, file_name)
                        db.execute("DELETE FROM assets WHERE finetune_id = ? AND file_name = ?",
                                   (finetune_id, file_name))
                        _remove(path)
                        removed["rows"] += 1
        if any(removed.values()):
            log.warning("finetunes: removed %d unfinished upload(s) or deletion(s), %d orphan file(s) or "
                        "folder(s), %d row(s) without their file", removed["unfinished"], removed["orphans"],
                        removed["rows"])
        return removed

    def reload_all(self, backend: Backend) -> list[str]:
        """Load every complete finetune into the backend (startup). Returns the ids loaded."""
        loaded = []
        for record in self.list():
            if not self.complete(record["id"]):
                continue
            try:
                backend.load_adapter(record["id"], record["name"], self.directory(record["id"]))
                loaded.append(record["id"])
            except (AdapterError, OSError, FinetuneNotFound) as e:
                log.error("finetune %s (%s) could not be loaded: %s", record["id"], record["name"], e)
        return loaded

"""The finetunes registry: a sqlite database file plus adapter files under `data_dir`.

    data_dir/finetunes.sqlite3           records (id, name, model, description, timestamps) + assets
    data_dir/finetunes/<id>/adapter_config.json
    data_dir/finetunes/<id>/adapter_model.safetensors

Rules, as on Workers AI: ids are uuids, names are unique, files are `adapter_config.json` and
`adapter_model.safetensors` only and cannot be replaced once uploaded. Every file is written to a
temporary file in the same directory, fsynced, then `os.replace`d into place, so a crash never
leaves a half-written adapter under its real name. When the second file arrives, the backend loads
(and so validates) the adapter; if that fails the new file is removed and the upload is refused.
On startup `reload_all` loads every complete finetune again, so adapters survive restarts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from serving.backend import AdapterError, Backend

log = logging.getLogger("serving.finetunes")

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_NAME = 128
MAX_DESCRIPTION = 4096
_COPY_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS finetunes (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, model TEXT NOT NULL, description TEXT NOT NULL,
  created_at TEXT NOT NULL, modified_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assets (
  finetune_id TEXT NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE, file_name TEXT NOT NULL,
  size INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (finetune_id, file_name));
"""


class FinetuneError(ValueError):
    """A request the registry refuses (duplicate name, bad file name, overwrite, bad file)."""


class FinetuneNotFound(KeyError):
    pass


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_asset(file_name: str, path: Path) -> None:
    """Cheap structural checks before the backend sees a file (real validation is the LoRA code's)."""
    if file_name == "adapter_config.json":
        try:
            config = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise FinetuneError(f"adapter_config.json is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise FinetuneError("adapter_config.json must be a JSON object")
    else:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FinetuneError("adapter_model.safetensors is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            try:
                if n > size - 8:
                    raise ValueError("header length past the end of the file")
                header = json.loads(f.read(n).decode("utf-8"))
                if not isinstance(header, dict):
                    raise ValueError("header is not an object")
            except ValueError as e:
                raise FinetuneError(f"adapter_model.safetensors is not a safetensors file: {e}") from None


class FinetuneStore:
    def __init__(self, data_dir: str | os.PathLike, model: str):
        self.root = Path(data_dir)
        self.files_dir = self.root / "finetunes"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "finetunes.sqlite3"
        self.model = model
        self._lock = threading.RLock()  # one writer at a time (check-then-write must be atomic)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
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
        (self.files_dir / record["id"]).mkdir(parents=True, exist_ok=True)
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
        with self._db() as db:
            rows = db.execute("SELECT file_name FROM assets WHERE finetune_id = ? ORDER BY file_name",
                              (finetune_id,)).fetchall()
        return [r["file_name"] for r in rows]

    def complete(self, finetune_id: str) -> bool:
        return set(REQUIRED_FILES) <= set(self.files(finetune_id))

    def directory(self, finetune_id: str) -> Path:
        return self.files_dir / finetune_id

    # -- files --------------------------------------------------------------------------------
    def add_asset(self, finetune_id: str, file_name: Any, stream: IO[bytes], backend: Backend,
                  max_bytes: int) -> dict[str, Any]:
        """Store one file atomically; when both are present, load the adapter into the backend."""
        if file_name not in REQUIRED_FILES:
            raise FinetuneError(f"file_name must be one of {', '.join(REQUIRED_FILES)}, got {file_name!r}")
        with self._lock:
            record = self.get(finetune_id)
            if file_name in self.files(finetune_id):
                raise FinetuneError(f"{file_name} was already uploaded to finetune {finetune_id}; "
                                    "files cannot be replaced")
            folder = self.directory(finetune_id)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / file_name
            size = _write_atomic(stream, target, max_bytes)
            try:
                check_asset(file_name, target)
                present = set(self.files(finetune_id)) | {file_name}
                if set(REQUIRED_FILES) <= present:
                    backend.load_adapter(finetune_id, record["name"], folder)
            except (FinetuneError, AdapterError):
                target.unlink(missing_ok=True)
                raise
            stamp = now_iso()
            with self._db() as db:
                db.execute("INSERT INTO assets VALUES (?, ?, ?, ?)", (finetune_id, file_name, size, stamp))
                db.execute("UPDATE finetunes SET modified_at = ? WHERE id = ?", (stamp, finetune_id))
            return {**record, "modified_at": stamp, "files": sorted(present)}

    def delete(self, finetune_id: str, backend: Backend) -> dict[str, Any]:
        with self._lock:
            record = self.get(finetune_id)
            backend.remove_adapter(finetune_id)
            with self._db() as db:
                db.execute("DELETE FROM finetunes WHERE id = ?", (finetune_id,))
            folder = self.directory(finetune_id)
            if folder.exists():  # rename first: the id's folder disappears atomically
                trash = folder.with_name(f".deleted-{finetune_id}-{uuid.uuid4().hex[:8]}")
                os.replace(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return record

    def reload_all(self, backend: Backend) -> list[str]:
        """Load every complete finetune into the backend (startup). Returns the ids loaded."""
        loaded = []
        for record in self.list():
            if not self.complete(record["id"]):
                continue
            try:
                backend.load_adapter(record["id"], record["name"], self.directory(record["id"]))
                loaded.append(record["id"])
            except (AdapterError, OSError) as e:
                log.error("finetune %s (%s) could not be loaded: %s", record["id"], record["name"], e)
        return loaded


def _write_atomic(stream: IO[bytes], target: Path, max_bytes: int) -> int:
    """Copy `stream` to a temp file next to `target`, fsync, then rename onto `target`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_COPY_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FinetuneError(f"{target.name} is larger than {max_bytes} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size

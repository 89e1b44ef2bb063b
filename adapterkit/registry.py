"""The adapter store: publish, resolve, verify, remove (gc: ``registry_gc.py``; lineage:
``lineage.py``; profiles, which live in the same index: ``profiles.py``).

A registry is a directory (``./adapters`` unless ``--registry DIR`` or $ADAPTERKIT_REGISTRY)
that says it is one: its ``index.sqlite`` carries SQLite's ``application_id`` (``APP_ID``) and
the schema version in ``user_version``, written when the first publish creates it. Nothing
else is ever treated as a registry: opening a folder does not create anything, a non-empty
folder without the marker is refused, and ``gc`` removes only what the registry made.

    <root>/index.sqlite          the marker; one row per entry and per profile (WAL, busy timeout)
    <root>/<name>/<version>/     the adapter files, immutable once published
    <root>/.tmp/                 publishes in progress (each holds an flock while alive)

The index is the truth: an entry exists when its row does. Publishing copies into
``.tmp``, verifies every sha256, then - inside one ``BEGIN IMMEDIATE`` transaction, which
serialises publishers across processes - picks the next version, renames the copy into
place and inserts the row. A crash before the commit leaves no row, so the entry does not
exist; ``gc`` removes what it left on disk. Only the standard library is imported here, so
the registry stays fast to open and safe to use from a subprocess.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapterkit.artifact import MANIFEST, read_manifest, rebase, sha256_file, verify_files
from adapterkit.errors import AdapterkitError, IntegrityError, RegistryError
from adapterkit.refs import parse_ref, validate_name
from adapterkit.safety import member

INDEX = "index.sqlite"
TMP = ".tmp"
WEIGHTS = "adapter_model.safetensors"
APP_ID = 0x616B7267  # "akrg": SQLite's application_id of an adapterkit registry index
SCHEMA_VERSION = 1
PAUSE_ENV = "ADAPTERKIT_PUBLISH_PAUSE"  # tests: "<point>" sleeps there so a kill lands mid-publish

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT NOT NULL, version INTEGER NOT NULL, stage TEXT, domain TEXT, base_id TEXT,
    tags TEXT NOT NULL, parent TEXT NOT NULL, files TEXT NOT NULL, weights_sha256 TEXT,
    created_at TEXT, published_at TEXT NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS entries_weights ON entries (weights_sha256);
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT PRIMARY KEY, domain TEXT NOT NULL, stack TEXT NOT NULL, mode TEXT NOT NULL,
    method TEXT NOT NULL, updated_at TEXT NOT NULL);
"""


def default_root() -> Path:
    return Path(os.environ.get("ADAPTERKIT_REGISTRY") or "adapters")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pause(point: str) -> None:
    """Test hook: with $ADAPTERKIT_PUBLISH_PAUSE=<point>, say so on stdout and sleep there."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"paused at {point}", flush=True)
        time.sleep(3600)


@dataclass
class Entry:
    """One published, immutable adapter version."""
    name: str
    version: int
    stage: str | None
    domain: str | None
    base_id: str | None
    tags: list[str]
    parent: list[dict]
    files: dict[str, str]
    weights_sha256: str | None
    created_at: str | None
    published_at: str
    path: Path
    manifest: dict = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self, manifest: bool = False) -> dict:
        out = asdict(self)
        out["path"], out["ref"] = str(self.path), self.ref
        if not manifest:
            out.pop("manifest")
        return out


class Registry:
    """A registry root: adapter directories plus the SQLite index."""

    def __init__(self, root: Path):
        self.root = root
        self.index = root / INDEX

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Registry":
        """The registry at ``root`` (or the default root), creating nothing: a missing or empty
        folder is a registry not made yet (reads find nothing; the first publish makes it); a
        folder holding anything else without the marker is refused."""
        root = Path(root).expanduser() if root is not None else default_root()
        if root.exists() and not root.is_dir():
            raise RegistryError(f"registry {root}: exists and is not a directory")
        reg = cls(root.resolve())
        if root.is_dir() and not reg.created and not reg._only_own_files():
            raise RegistryError(f"{root}: not an adapterkit registry (no {INDEX} marking it as one) and "
                                "not empty; refusing to use it. Give --registry a new or empty folder")
        return reg

    def _only_own_files(self) -> bool:
        """Nothing but what a first publish creates (one may be under way in another process),
        and a README.md (the one ``./adapters`` ships with, which nothing here ever removes)."""
        own = {TMP, INDEX, f"{INDEX}-wal", f"{INDEX}-shm", f"{INDEX}-journal", "README.md"}
        return all(p.name in own for p in self.root.iterdir()) and self._index_info()[2] == 0

    def _index_info(self) -> tuple[int, int, int]:
        """(application_id, user_version, tables) of the index; (0, 0, 0) when absent or empty."""
        if not self.index.is_file():
            return 0, 0, 0
        try:
            db = sqlite3.connect(f"{self.index.as_uri()}?mode=ro", uri=True, timeout=60)
            try:
                app_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'entries'").fetchone()[0]
                other = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return -1, 0, 1  # not SQLite: someone else's file
        return app_id, version, (-1 if tables else other)  # -1: has our entries table

    @property
    def created(self) -> bool:
        """The root holds a registry index with our marker (or a pre-marker index with our table)."""
        app_id, version, tables = self._index_info()
        if app_id == APP_ID and version > SCHEMA_VERSION:
            raise RegistryError(f"registry {self.root}: schema version {version} is newer than this "
                                f"adapterkit knows ({SCHEMA_VERSION}); upgrade adapterkit")
        return app_id == APP_ID or (app_id == 0 and tables == -1)

    def require(self) -> "Registry":
        """Refuse a registry that does not exist yet (every command but publish uses this)."""
        if not self.created:
            raise RegistryError(f"no adapterkit registry at {self.root} (publish an adapter there "
                                "first, or name another with --registry)")
        return self

    def _create(self) -> None:
        """Make the root, its staging folder and the marked index (the first publish does)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.connect(create=True) as db:
            db.execute(f"PRAGMA application_id = {APP_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.executescript(SCHEMA)
        (self.root / TMP).mkdir(exist_ok=True)

    # -- the index -----------------------------------------------------------------------

    @contextmanager
    def connect(self, create: bool = False):
        """A connection to the index; a registry not made yet reads as an empty one (in memory),
        so that looking at a folder never writes to it."""
        if create or self.index.is_file():
            db = sqlite3.connect(self.index, timeout=60, isolation_level=None)
        else:
            db = sqlite3.connect(":memory:", isolation_level=None)
            db.executescript(SCHEMA)
        try:
            db.execute("PRAGMA busy_timeout = 60000")
            db.execute("PRAGMA journal_mode = WAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self):
        """One write transaction; BEGIN IMMEDIATE takes the lock up front (no upgrade deadlock)."""
        if not self.index.is_file():
            raise RegistryError(f"no adapterkit registry at {self.root}")
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _entry(self, row: sqlite3.Row) -> Entry:
        return Entry(name=row["name"], version=row["version"], stage=row["stage"], domain=row["domain"],
                     base_id=row["base_id"], tags=json.loads(row["tags"]), parent=json.loads(row["parent"]),
                     files=json.loads(row["files"]), weights_sha256=row["weights_sha256"],
                     created_at=row["created_at"], published_at=row["published_at"],
                     path=self.root / row["name"] / str(row["version"]), manifest=json.loads(row["manifest"]))

    # -- publish -------------------------------------------------------------------------

    def publish(self, adapter_dir: str | os.PathLike, name: str | None = None, domain: str | None = None,
                tags: list[str] = (), parents: list[str] | None = None) -> Entry:
        """Copy a trained adapter directory in as ``name``'s next version; returns the entry. Its
        parents are resolved here, once (``lineage.resolve_parents``; ``parents``: the user's refs)."""
        from adapterkit.lineage import resolve_parents
        src = Path(adapter_dir)
        manifest = read_manifest(src)
        name = validate_name(name if name is not None else manifest.get("name") or src.name)
        domain = domain or manifest.get("domain") or "general"
        resolved = resolve_parents(self, manifest, domain, parents, src)
        if not (src / "adapter_config.json").is_file():
            raise RegistryError(f"{src}: not an adapter directory (no adapter_config.json)")
        if not (src / WEIGHTS).is_file() or WEIGHTS not in manifest.get("files", {}):
            raise RegistryError(f"{src}: no {WEIGHTS} listed in its {MANIFEST}; adapterkit publishes "
                                "safetensors weights only (adapter_model.bin is pickle)")
        verify_files(src, manifest)  # a tampered source or a path out of it is refused, named
        if not self.created:
            self._create()
        with self._staging() as tmp:
            for fname in manifest.get("files", {}):
                shutil.copy2(member(src, fname), member(tmp, fname))
            verify_files(tmp, manifest)
            _pause("copied")
            with self.transaction() as db:
                version = self._next_version(db, name)
                manifest = self._stamp(tmp, {**manifest, "parent": resolved}, name, version, domain, tags, src)
                final = self.root / name / str(version)
                final.parent.mkdir(exist_ok=True)
                os.replace(tmp, final)
                try:
                    _pause("renamed")
                    self._insert(db, manifest)
                    _pause("inserted")
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)  # the row rolls back; so do the files
                    raise
            _pause("published")
        return self.get(f"{name}@{version}")

    @contextmanager
    def _staging(self):
        """A temp dir in ``.tmp`` whose lock file is flocked while this process lives."""
        token = uuid.uuid4().hex
        (self.root / TMP).mkdir(exist_ok=True)  # another first publisher may not have made it yet
        lock = open(self.root / TMP / f"{token}.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = self.root / TMP / token
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place
            os.unlink(lock.name)
            lock.close()

    def _next_version(self, db, name: str) -> int:
        """max(version)+1; a directory left by a crash after its rename is cleared first
        (safe: the caller holds the write lock, so no live publisher owns it)."""
        row = db.execute("SELECT MAX(version) FROM entries WHERE name = ?", (name,)).fetchone()
        version = (row[0] or 0) + 1
        stale = self.root / name / str(version)
        if stale.exists():
            shutil.rmtree(stale)
        return version

    def _stamp(self, tmp: Path, manifest: dict, name: str, version: int, domain: str,
               tags, src: Path) -> dict:
        """Write the registry's name/version/domain into the copy's manifest and card; paths
        recorded relative to ``src`` are made relative to the entry's folder."""
        from adapterkit.cards import model_card
        final = self.root / name / str(version)
        manifest = {**rebase(manifest, src, final), "name": name, "version": version, "domain": domain,
                    "tags": list(dict.fromkeys([*manifest.get("tags", []), *tags])), "published_at": now(),
                    "published_from": {"path": os.path.relpath(src.resolve(), final), "name": manifest.get("name")}}
        files = dict(manifest.get("files", {}))
        if "README.md" in files:
            (tmp / "README.md").write_text(model_card(manifest, list(files)))
            files["README.md"] = sha256_file(tmp / "README.md")
        manifest["files"] = files
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        return manifest

    def _insert(self, db, m: dict) -> None:
        base_id = (m.get("base") or {}).get("fingerprint", {}).get("id")
        db.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m["name"], m["version"], m.get("stage"), m["domain"], base_id, json.dumps(m["tags"]),
             json.dumps(m.get("parent", [])), json.dumps(m["files"]), m["files"].get(WEIGHTS),
             m.get("created_at"), m["published_at"], json.dumps(m, default=str)))

    # -- read ----------------------------------------------------------------------------

    def list(self, domain: str | None = None, stage: str | None = None, base: str | None = None,
             tag: str | None = None, name: str | None = None, latest: bool = False) -> list[Entry]:
        """Entries, oldest first, filtered; ``latest`` keeps each name's newest version."""
        where, args = [], []
        for column, value in (("domain", domain), ("stage", stage), ("base_id", base), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(entries.tags) WHERE value = ?)")
            args.append(tag)
        sql = "SELECT * FROM entries" + (" WHERE " + " AND ".join(where) if where else "")
        with self.connect() as db:
            entries = [self._entry(r) for r in db.execute(sql + " ORDER BY name, version", args)]
        if latest:
            entries = list({e.name: e for e in entries}.values())
        return entries

    def get(self, ref: str) -> Entry:
        """Resolve ``name``, ``name@latest`` or ``name@3`` to its entry."""
        name, version = parse_ref(ref)
        with self.connect() as db:
            versions = [r[0] for r in db.execute(
                "SELECT version FROM entries WHERE name = ? ORDER BY version", (name,))]
            if not versions:
                known = [r[0] for r in db.execute("SELECT DISTINCT name FROM entries ORDER BY name")]
                raise RegistryError(f"no adapter named {name!r} in the registry {self.root}"
                                    f" (known: {', '.join(known[:20]) or 'none'})")
            if version is not None and version not in versions:
                raise RegistryError(f"{name}@{version}: no such version in the registry {self.root}; "
                                    f"{name} has versions {', '.join(map(str, versions))}")
            row = db.execute("SELECT * FROM entries WHERE name = ? AND version = ?",
                             (name, version or versions[-1])).fetchone()
        return self._entry(row)

    def by_sha(self, sha256: str | None) -> list[Entry]:
        """Entries whose weights have this sha256, oldest first (lineage resolves among them)."""
        with self.connect() as db:
            return [self._entry(r) for r in db.execute(
                "SELECT * FROM entries WHERE weights_sha256 = ? ORDER BY name, version", (sha256 or "",))]

    def path(self, ref: str, verify: bool = True) -> Path:
        """The entry's directory, its files checked against their sha256 first."""
        entry = self.get(ref)
        if verify:
            self.verify(entry.ref)
        return entry.path

    def verify(self, ref: str) -> Entry:
        """Every file of the entry against the sha256 in the index; raises naming the file."""
        entry = self.get(ref)
        if not entry.path.is_dir():
            raise IntegrityError(f"{entry.ref}: its directory {entry.path} is missing")
        verify_files(entry.path, {"files": entry.files})
        if read_manifest(entry.path) != entry.manifest:
            raise IntegrityError(f"{entry.path / MANIFEST}: differs from the index; the manifest was "
                                 f"changed after {entry.ref} was published")
        return entry

    def verify_all(self) -> dict[str, str | None]:
        """ref -> None when intact, else the error message."""
        out = {}
        for entry in self.list():
            try:
                self.verify(entry.ref)
                out[entry.ref] = None
            except AdapterkitError as err:
                out[entry.ref] = str(err)
        return out

    # -- remove and gc -------------------------------------------------------------------

    def remove(self, ref: str) -> list[str]:
        """Remove ``name@N`` (or every version with ``name@all``); returns the removed refs.
        The row goes first, in one transaction; the files after it."""
        name, _, version = str(ref).partition("@")
        if version in ("", "latest"):
            raise RegistryError(f"{ref!r}: say which version to remove (name@3), or name@all")
        entries = self.list(name=validate_name(name)) if version == "all" else [self.get(ref)]
        if not entries:
            raise RegistryError(f"no adapter named {name!r} in the registry {self.root}")
        with self.transaction() as db:
            for e in entries:
                db.execute("DELETE FROM entries WHERE name = ? AND version = ?", (e.name, e.version))
        for e in entries:
            shutil.rmtree(e.path, ignore_errors=True)
        with self.transaction():  # holding the lock: no publisher is between its mkdir and rename
            rmdir_if_empty(self.root / name)
        return [e.ref for e in entries]


def rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or gone

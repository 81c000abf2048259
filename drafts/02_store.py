# %%
#| default_exp store

# %% [md]
# # Store
#
# > The lab database: one SQLAlchemy Core engine over SQLite (default) or Postgres, the schema every object shares,
# > and a schema-version check.

# %%
#| export
from __future__ import annotations
import json, os, threading
from pathlib import Path
from types import SimpleNamespace
from contextlib import contextmanager
import sqlalchemy as sa
from sqlalchemy import event
from openpipe_lab.core import *

# %%
#| hide
from fastcore.test import *
import tempfile

# %% [md]
# ## Schema
#
# All tables live in one `MetaData`, defined here once, so every part of the library (and every process: a
# notebook, a training worker, a script) agrees on them. JSON documents (request/response payloads, messages,
# configs) are stored as text we serialise ourselves: the same bytes on SQLite and Postgres, and no
# driver-specific JSON quirks. What we filter on gets its own indexed column: the model, the status code, the
# completion id, and each metadata tag as a `(key, value)` row in `log_tags`.
#
# `SCHEMA_VERSION` is bumped on every incompatible change. A database written by a newer version is refused
# with a clear error instead of being silently misread.

# %%
#| export
SCHEMA_VERSION = 1
metadata = sa.MetaData()
_s, _t, _i, _b, _f = sa.String, sa.Text, sa.BigInteger, sa.Boolean, sa.Float

def _table(name, *cols, **kw): return sa.Table(name, metadata, *cols, **kw)

tables = SimpleNamespace(
    meta=_table('meta', sa.Column('key', _s(64), primary_key=True), sa.Column('value', _t, nullable=False)),
    logs=_table('logs',
        sa.Column('id', _s(40), primary_key=True),
        sa.Column('created_at', _i, nullable=False),          # ms: when the row was recorded
        sa.Column('requested_at', _i), sa.Column('received_at', _i),  # ms, as in /report
        sa.Column('model', _s(256), index=True),              # the model id as requested ("anthropic:claude-...")
        sa.Column('provider', _s(64)),                         # openai | anthropic | gemini | openpipe | custom name
        sa.Column('status_code', sa.Integer),
        sa.Column('error_message', _t),
        sa.Column('req_payload', _t),                          # JSON
        sa.Column('resp_payload', _t),                         # JSON (OpenAI chat.completion shape)
        sa.Column('completion_id', _s(128), index=True),
        sa.Column('tags', _t),                                 # JSON object string -> string (mirror of log_tags)
        sa.Column('prompt_tokens', sa.Integer), sa.Column('completion_tokens', sa.Integer),
        sa.Column('cost', _f), sa.Column('duration_ms', sa.Integer),
        sa.Column('cache_hit', _b, nullable=False, default=False),
        sa.Column('stream', _b, nullable=False, default=False),
        sa.Column('parent_id', _s(40)),                        # fallback: the failed attempt this one retried
        sa.Column('source', _s(32)),                           # client | report | report_anthropic | proxy
    ),
    log_tags=_table('log_tags',                              # clustered by log (no rowid): one index for filters
        sa.Column('log_id', _s(40), primary_key=True),
        sa.Column('key', _s(255), primary_key=True), sa.Column('value', _t, nullable=False),
        sa.Index('ix_log_tags_key_value', 'key', 'value', 'log_id'), sqlite_with_rowid=False),
    cache=_table('cache',
        sa.Column('key', _s(64), primary_key=True), sa.Column('model', _s(256)),
        sa.Column('created_at', _i, nullable=False), sa.Column('expires_at', _i, nullable=False, index=True),
        sa.Column('response', _t, nullable=False), sa.Column('hits', sa.Integer, nullable=False, default=0)),
    providers=_table('providers',
        sa.Column('name', _s(128), primary_key=True), sa.Column('base_url', _t, nullable=False),
        sa.Column('api_key_env', _s(128)), sa.Column('kind', _s(16), nullable=False),
        sa.Column('config', _t), sa.Column('created_at', _i, nullable=False)),
    datasets=_table('datasets',
        sa.Column('id', _s(40), primary_key=True), sa.Column('name', _s(255), nullable=False, unique=True),
        sa.Column('created_at', _i, nullable=False), sa.Column('updated_at', _i, nullable=False),
        sa.Column('config', _t)),
    dataset_entries=_table('dataset_entries',
        sa.Column('id', _s(40), primary_key=True),
        sa.Column('dataset_id', _s(40), nullable=False, index=True),
        sa.Column('position', _i, nullable=False),             # insertion order within the dataset
        sa.Column('messages', _t, nullable=False),             # JSON list, ends with the assistant output
        sa.Column('tools', _t), sa.Column('tool_choice', _t), sa.Column('response_format', _t),
        sa.Column('rejected_message', _t), sa.Column('metadata', _t),
        sa.Column('split', _s(8), nullable=False),             # TRAIN | TEST
        sa.Column('provenance', _s(32), nullable=False),       # REQUEST_LOG | UPLOAD | RELABELED_BY_MODEL | RELABELED_BY_HUMAN
        sa.Column('log_id', _s(40)), sa.Column('history', _t), # earlier outputs, JSON list
        sa.Column('entry_hash', _s(64), nullable=False),
        sa.Column('created_at', _i, nullable=False), sa.Column('updated_at', _i, nullable=False),
        sa.Index('ix_entries_dataset_position', 'dataset_id', 'position')),
    pruning_rules=_table('pruning_rules',
        sa.Column('id', _s(40), primary_key=True), sa.Column('dataset_id', _s(40), nullable=False, index=True),
        sa.Column('text', _t, nullable=False), sa.Column('position', sa.Integer, nullable=False),
        sa.Column('created_at', _i, nullable=False)),
    models=_table('models',
        sa.Column('id', _s(40), primary_key=True), sa.Column('slug', _s(128), nullable=False, unique=True),
        sa.Column('kind', _s(16), nullable=False),             # openpipe (LLM) | openpipeReward
        sa.Column('base_model', _t, nullable=False), sa.Column('dataset_id', _s(40)),
        sa.Column('dataset_snapshot', _s(64)),
        sa.Column('status', _s(16), nullable=False),           # PENDING | TRAINING | DEPLOYED | ERROR
        sa.Column('error_message', _t),
        sa.Column('config', _t, nullable=False),               # JSON: the full training config
        sa.Column('pruning_rules', _t),                        # JSON list inherited from the dataset
        sa.Column('output_dir', _t), sa.Column('pid', sa.Integer),
        sa.Column('progress', _t), sa.Column('metrics', _t),   # JSON
        sa.Column('created_at', _i, nullable=False), sa.Column('updated_at', _i, nullable=False)),
    training_history=_table('training_history',
        sa.Column('model_id', _s(40), nullable=False, index=True), sa.Column('step', sa.Integer, nullable=False),
        sa.Column('record', _t, nullable=False), sa.Column('created_at', _i, nullable=False)),
    deployments=_table('deployments',
        sa.Column('id', _s(40), primary_key=True), sa.Column('url', _t), sa.Column('base_model', _t),
        sa.Column('status', _s(16), nullable=False), sa.Column('pid', sa.Integer), sa.Column('host', _s(255)),
        sa.Column('config', _t), sa.Column('log_path', _t),
        sa.Column('created_at', _i, nullable=False), sa.Column('updated_at', _i, nullable=False)),
    deployment_models=_table('deployment_models',
        sa.Column('deployment_id', _s(40), nullable=False, index=True),
        sa.Column('slug', _s(128), nullable=False, index=True), sa.Column('served_name', _s(255), nullable=False)),
)

# %% [md]
# ## JSON columns
#
# One pair of helpers turns Python values into column text and back. `None` stays SQL `NULL`, so "no tools"
# and "empty tools list" remain distinguishable.

# %%
#| export
def dumps(value) -> str | None:
    "JSON text for a column (`None` stays `None`)."
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(',', ':'))

def loads(text: str | None):
    "The Python value of a JSON column (`None` stays `None`)."
    return None if text is None else json.loads(text)

# %%
test_eq(loads(dumps({'a': [1, 'é']})), {'a': [1, 'é']})
test_eq(dumps(None), None)

# %% [md]
# ## The engine
#
# `Database(url)` accepts a SQLite file path (relative or absolute), a `sqlite:///` URL or any SQLAlchemy URL
# (`postgresql+psycopg://...`). For SQLite, several processes write to one file (a notebook, a training worker,
# a script), so every connection turns on WAL (readers never block the writer), a 30 s busy timeout (a writer
# waits for the lock instead of failing with "database is locked") and `synchronous=NORMAL` (durable at each
# WAL checkpoint, the usual setting with WAL). Write transactions (`db.begin()`) start with `BEGIN IMMEDIATE`, so
# a read-then-write transaction takes the write lock up front and cannot deadlock against another writer; reads
# (`db.connect()`) start a deferred transaction and never block a writer.
#
# Opening creates the schema if it is missing (idempotent `create_all`) and checks the stored schema version.

# %%
#| export
def _normalise_url(url: str) -> str:
    if '://' in url: return url
    path = Path(url).expanduser()
    try: path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabDirError(f"cannot create {path.parent} for the lab database: {e.strerror}. "
                          "Pass a writable path or set OPENPIPE_LAB_DB.") from None
    return f"sqlite:///{path.resolve()}"

def _sqlite_pragmas(dbapi_conn, _):
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute('PRAGMA busy_timeout=30000')
    try: cur.execute('PRAGMA journal_mode=WAL')
    except Exception: pass  # read-only media: keep the default journal
    cur.execute('PRAGMA synchronous=NORMAL')
    cur.execute('PRAGMA foreign_keys=ON')
    cur.execute('PRAGMA cache_size=-65536')  # 64 MiB page cache: index inserts stay in memory
    cur.execute('PRAGMA temp_store=MEMORY')
    cur.close()

def _sqlite_begin(conn):
    # writes take the lock up front (no deadlock between two read-then-write transactions); reads stay deferred
    conn.exec_driver_sql('BEGIN IMMEDIATE' if conn.get_execution_options().get('openpipe_write') else 'BEGIN')

class Database:
    "A lab database: engine, schema and version check, over SQLite or Postgres."
    def __init__(self, url: str  # SQLite path or SQLAlchemy URL
                ):
        self.url = _normalise_url(str(url))
        self.dialect = self.url.split(':', 1)[0].split('+')[0]
        kw = {}
        if self.dialect == 'sqlite': kw['connect_args'] = {'check_same_thread': False, 'timeout': 30}
        else: kw.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
        try: self.engine = sa.create_engine(self.url, **kw)
        except Exception as e:
            raise StoreError(f"cannot open database {self._safe_url()}: {e}. Check the URL "
                             "(a SQLite path, or postgresql+psycopg://user@host/db; for Postgres: pip install \"openpipe-lab[postgres]\").") from None
        if self.dialect == 'sqlite':
            event.listen(self.engine, 'connect', _sqlite_pragmas)
            event.listen(self.engine, 'begin', _sqlite_begin)
        self._writer_engine = self.engine.execution_options(openpipe_write=True)
        self.t = tables
        self._init_schema()

    def _safe_url(self) -> str:
        try: return sa.engine.make_url(self.url).render_as_string(hide_password=True)
        except Exception: return '<database url>'

    def _init_schema(self):
        try:
            with self._writer_engine.begin() as c:
                metadata.create_all(c)
                row = c.execute(sa.select(tables.meta.c.value).where(tables.meta.c.key == 'schema_version')).first()
                if row is None:
                    c.execute(tables.meta.insert().values(key='schema_version', value=str(SCHEMA_VERSION)))
                    return
        except sa.exc.OperationalError as e:
            msg = str(e.orig) if getattr(e, 'orig', None) else str(e)
            if 'readonly' in msg or 'read-only' in msg or 'unable to open' in msg:
                raise StoreError(f"cannot write the lab database {self._safe_url()}: {msg}. "
                                 "Make the file and its directory writable, or point OPENPIPE_LAB_DB elsewhere.") from None
            raise StoreError(f"cannot open the lab database {self._safe_url()}: {msg}") from None
        except sa.exc.DatabaseError as e:
            raise StoreError(f"{self._safe_url()} is not a usable lab database ({getattr(e, 'orig', e)}). "
                             "Point OPENPIPE_LAB_DB at a new file, or move this one aside.") from None
        found = row[0]
        if not found.isdigit() or int(found) > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the lab database {self._safe_url()} has schema version {found}, newer than this openpipe_lab "
                f"understands ({SCHEMA_VERSION}). Upgrade: pip install -U openpipe-lab (nothing was changed in the database).")

    def begin(self):
        "A write transaction (context manager): committed on success, rolled back on error."
        return self._writer_engine.begin()

    def connect(self):
        "A connection for reads (context manager)."
        return self.engine.connect()

    def dispose(self): self.engine.dispose()
    def __repr__(self): return f"Database({self._safe_url()!r})"

# %% [md]
# A fresh file gets the whole schema and the current version; reopening it is a no-op.

# %%
d = tempfile.mkdtemp()
db = Database(f"{d}/lab.db")
with db.connect() as c:
    test_eq(c.exec_driver_sql('PRAGMA journal_mode').scalar(), 'wal')
    test_eq(c.execute(sa.select(tables.meta.c.value)).scalar(), str(SCHEMA_VERSION))
    assert {'logs', 'log_tags', 'datasets', 'dataset_entries', 'models', 'deployments'} <= set(sa.inspect(c).get_table_names())
Database(f"{d}/lab.db");  # reopening an existing lab is a no-op

# %% [md]
# A read in progress does not block a write, in the same thread or another process:

# %%
with db.connect() as reader:
    reader.execute(sa.select(tables.logs)).all()
    with db.begin() as w: w.execute(tables.providers.insert().values(name='p', base_url='http://x', kind='openai', created_at=now_ms()))
with db.connect() as c: test_eq(c.execute(sa.select(sa.func.count()).select_from(tables.providers)).scalar(), 1)

# %% [md]
# A database from a newer version of the library is refused, and left untouched:

# %%
with db.begin() as c: c.execute(tables.meta.update().values(value='999'))
test_fail(lambda: Database(f"{d}/lab.db"), contains='schema version 999, newer than')
with db.connect() as c: test_eq(c.execute(sa.select(tables.meta.c.value)).scalar(), '999')

# %% [md]
# Garbage in place of a database, and an unwritable location, give our error with the fix:

# %%
Path(f"{d}/junk.db").write_bytes(b'this is not sqlite' * 100)
test_fail(lambda: Database(f"{d}/junk.db"), contains='not a usable lab database')
Path(f"{d}/afile").write_text('x')
test_fail(lambda: Database(f"{d}/afile/lab.db"), contains='Pass a writable path')

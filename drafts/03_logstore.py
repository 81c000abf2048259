# %%
#| default_exp logstore

# %% [md]
# # LogStore
#
# > Record every LLM request: a background batching writer, queries by model / tag / time / text, the hosted
# > product's `/report`, `/report-anthropic`, export and update-metadata semantics, on SQLite or Postgres.

# %%
#| export
from __future__ import annotations
import atexit, json, os, queue, threading, time, warnings, weakref, datetime as _dt
from pathlib import Path
import sqlalchemy as sa
from fastcore.basics import patch
from openpipe_lab.core import *
from openpipe_lab.store import Database, tables, dumps, loads

# %%
#| hide
from fastcore.test import *
import tempfile

# %% [md]
# ## Opening a lab
#
# `LogStore()` opens the default lab (`./.openpipe_lab/lab.db`, or `$OPENPIPE_LAB_DB`); `LogStore("x/lab.db")`
# a SQLite file; `LogStore("postgresql+psycopg://...")` a team database. Its artifact directory (adapters,
# checkpoints, server logs) is `dir=` if given, else `$OPENPIPE_LAB_DIR`, else the SQLite file's folder, else
# `./.openpipe_lab`. Every other object (`Dataset`, `FineTune`, `Deployment`, `Eval`) takes `store=` and
# falls back to `get_store()`, the default lab, opened once per process.

# %%
#| export
def _resolve_dir(url: str, dir) -> Path:
    if dir is not None: path = Path(dir).expanduser().resolve()
    elif os.environ.get('OPENPIPE_LAB_DIR'): return lab_dir()
    elif '://' not in url: path = Path(url).expanduser().resolve().parent
    elif url.startswith('sqlite:///') and len(url) > 10: path = Path(url[10:]).expanduser().resolve().parent
    else: return lab_dir()
    try: path.mkdir(parents=True, exist_ok=True)
    except OSError as e: raise LabDirError(f"cannot create the lab directory {path}: {e.strerror}. Pass a writable dir=.") from None
    return path

_STORES: dict = {}

def get_store(store: 'LogStore' | None = None) -> 'LogStore':
    "`store` if given, else the default lab's `LogStore` (one per database URL per process)."
    if store is not None:
        if not isinstance(store, LogStore): raise ConfigError(f"store= must be a LogStore, got {type(store).__name__}")
        return store
    url = default_db_url()
    if url not in _STORES: _STORES[url] = LogStore(url)
    return _STORES[url]

# %% [md]
# ## The background writer
#
# The hosted SDK promises that logging adds no latency: it returns the completion and records afterwards. We do
# the same with a queue and one writer thread per `LogStore`. The caller's thread only serialises the request
# (so a `messages` list the caller keeps appending to cannot change what was logged) and enqueues; the writer
# waits 5 ms after the first row of a burst (so it competes less with the caller for the CPU), then takes
# everything queued, up to `batch_size` rows, and writes it in one transaction — logs and their tag rows
# together, so a reader never sees a log without its tags. `flush()` blocks until everything enqueued before it
# is durable; interpreter exit flushes every open store.
#
# A batch that fails (the database is briefly unavailable, say) is retried with back-off; rows are never
# dropped silently: after the retries, they are appended to `<lab dir>/unwritten-logs.jsonl` with a warning.

# %%
#| export
_LOG_COLS = ('id', 'created_at', 'requested_at', 'received_at', 'model', 'provider', 'status_code', 'error_message',
             'req_payload', 'resp_payload', 'completion_id', 'tags', 'prompt_tokens', 'completion_tokens', 'cost',
             'duration_ms', 'cache_hit', 'stream', 'parent_id', 'source')

def _jsonable(obj):
    "A JSON-ready value from dicts, lists and the SDKs' pydantic models."
    if obj is None or isinstance(obj, (dict, list, str, int, float, bool)): return obj
    if hasattr(obj, 'model_dump'): return obj.model_dump(mode='json', exclude_unset=True)
    if hasattr(obj, 'to_dict'): return obj.to_dict()
    raise ValidationError(f"cannot record a payload of type {type(obj).__name__}: pass a dict or an SDK response object")

def _payload_text(obj) -> str | None:
    if obj is None: return None
    if isinstance(obj, str):
        try: json.loads(obj)
        except ValueError as e: raise ValidationError(f"payload is a string but not JSON: {e}") from None
        return obj
    return dumps(_jsonable(obj))

class _Writer:
    def __init__(self, store, batch_size=5000, linger=0.005):
        self.store, self.batch_size, self.linger = weakref.proxy(store), batch_size, linger
        self.q, self.error = queue.SimpleQueue(), None
        self.thread = threading.Thread(target=self._run, name='openpipe-lab-log-writer', daemon=True)
        self.thread.start()

    def put(self, row): self.q.put(row)

    def flush(self, timeout=None):
        done = threading.Event(); self.q.put(done)
        if not done.wait(timeout): raise StoreError(f"log writer did not drain within {timeout}s")

    def _run(self):
        while True:
            item = self.q.get()
            if isinstance(item, dict): time.sleep(self.linger)  # let a burst accumulate: fewer, larger transactions
            batch, events = [], []
            while True:
                if item is None: return self._write(batch)
                (events if isinstance(item, threading.Event) else batch).append(item)
                if len(batch) >= self.batch_size: break
                try: item = self.q.get_nowait()
                except queue.Empty: break
            if batch: self._write(batch)
            for e in events: e.set()

    def _write(self, batch):
        if not batch: return
        for attempt in range(6):
            try: return self.store._insert_rows(batch)
            except ReferenceError: return
            except Exception as e:
                err = e; time.sleep(0.05 * 2 ** attempt)
        try:
            path = self.store.dir / 'unwritten-logs.jsonl'
            with open(path, 'a') as f:
                for r in batch: f.write(json.dumps({k: v for k, v in r.items() if k != '_tags'} | {'tags': r['_tags']}) + '\n')
            warnings.warn(f"openpipe_lab could not write {len(batch)} logs to the database ({err}); saved them to {path}")
        except Exception as e2:
            warnings.warn(f"openpipe_lab lost {len(batch)} logs: database error {err}; fallback file error {e2}")

    def close(self):
        if self.thread.is_alive(): self.q.put(None); self.thread.join(30)

_OPEN_STORES = weakref.WeakSet()

@atexit.register
def _flush_all_at_exit():
    for s in list(_OPEN_STORES):
        try: s.close()
        except Exception: pass

# %% [md]
# ## `LogStore`

# %%
#| export
def _check_tags(tags, path: str) -> dict:
    "Metadata tags as string->string; deprecated non-string scalars are stringified, anything else is an error."
    if tags is None: return {}
    if not isinstance(tags, dict): raise ValidationError(f"{path}: must be an object of string values, got {type(tags).__name__}")
    out, problems = {}, []
    for k, v in tags.items():
        if not isinstance(k, str) or not k: problems.append(f"{path}: tag names must be non-empty strings, got {k!r}")
        elif v is None: continue
        elif isinstance(v, str): out[k] = v
        elif isinstance(v, (bool, int, float)): out[k] = json.dumps(v)
        else: problems.append(f"{path}.{k}: must be a string, got {type(v).__name__}")
    if problems: raise ValidationError(f"invalid metadata tags in {path}", problems)
    return out

def _ms(value, path: str):
    if value is None: return None
    if isinstance(value, _dt.datetime): return int(value.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{path}: must be a Unix timestamp in milliseconds (a number) or a datetime, got {value!r}")
    return int(value)

class LogStore:
    "A lab: the database of request logs, datasets, models and deployments, plus an artifact directory."
    def __init__(self, url: str | None = None,  # SQLite path or SQLAlchemy URL; default `$OPENPIPE_LAB_DB` or `<lab dir>/lab.db`
                 dir: str | Path | None = None,  # artifact directory; default see above
                 batch_size: int = 5000):  # most rows the background writer inserts per transaction
        self.url = str(url) if url is not None else default_db_url()
        self.dir = _resolve_dir(self.url, dir)
        self.db = Database(self.url)
        self.t = self.db.t
        self._writer, self._lock, self._batch_size = None, threading.Lock(), batch_size
        _OPEN_STORES.add(self)

    # -- writing ---------------------------------------------------------------------------------------------
    def _get_writer(self):
        if self._writer is None:
            with self._lock:
                if self._writer is None: self._writer = _Writer(self, self._batch_size)
        return self._writer

    def record(self, *, model: str | None = None, req_payload=None, resp_payload=None, status_code: int | None = None,
               error_message: str | None = None, requested_at=None, received_at=None, tags: dict | None = None,
               completion_id: str | None = None, provider: str | None = None, cache_hit: bool = False,
               stream: bool = False, parent_id: str | None = None, source: str = 'client',
               prompt_tokens: int | None = None, completion_tokens: int | None = None, cost: float | None = None,
               duration_ms: int | None = None, id: str | None = None) -> str:
        "Enqueue one log for the background writer and return its id; never waits on the database."
        req_text = _payload_text(req_payload)  # now: the caller may mutate its request afterwards
        row = dict(id=id or new_id('log'), created_at=now_ms(), requested_at=_ms(requested_at, 'requested_at'),
                   received_at=_ms(received_at, 'received_at'), model=model, provider=provider,
                   status_code=status_code, error_message=error_message, req_payload=req_text,
                   resp_payload=resp_payload, completion_id=completion_id, _tags=_check_tags(tags, 'tags'),
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
                   duration_ms=duration_ms, cache_hit=bool(cache_hit), stream=bool(stream), parent_id=parent_id,
                   source=source)
        self._get_writer().put(row)
        return row['id']

    def _insert_rows(self, rows: list[dict]):
        "Write rows (from the writer thread) in one transaction: logs and their tags together."
        log_vals, tag_vals = [], []
        for r in rows:
            if not isinstance(r['resp_payload'], (str, type(None))): r['resp_payload'] = _payload_text(r['resp_payload'])
            tags = r['_tags']
            r['tags'] = dumps(tags) if tags else None
            log_vals.append(tuple(r[c] for c in _LOG_COLS))
            tag_vals.extend((r['id'], k, v) for k, v in tags.items())
        ph = '?' if self.db.dialect == 'sqlite' else '%s'
        with self.db.begin() as c:
            c.exec_driver_sql(f"INSERT INTO logs ({', '.join(_LOG_COLS)}) VALUES ({', '.join([ph] * len(_LOG_COLS))})", log_vals)
            if tag_vals: c.exec_driver_sql(f"INSERT INTO log_tags (log_id, key, value) VALUES ({ph}, {ph}, {ph})", tag_vals)

    def flush(self, timeout: float | None = 60):
        "Block until every log enqueued so far is in the database."
        if self._writer is not None: self._writer.flush(timeout)

    def close(self):
        "Flush and stop the writer; the store can still be read (and writing restarts the writer)."
        w, self._writer = self._writer, None
        if w is not None: w.close()

    def __del__(self):
        try: self.close()
        except Exception: pass

    def __repr__(self): return f"LogStore({self.db._safe_url()!r})"

# %% [md]
# ### `report`: the hosted product's `/report`
#
# Applications that call a model themselves (another SDK, a batch job, a different language through a file)
# record the call afterwards, with the same fields as the hosted `/report` body: `requested_at` and
# `received_at` in milliseconds, the request and response payloads, the status code and an error message.
# Metadata tags come from `req_payload["metadata"]` (the current way) merged with `metadata=` and the deprecated
# `tags=` (whose numbers and booleans are stringified, as the spec allows). Bad input raises here, naming the
# field, and nothing is written.

# %%
#| export
def _usage(resp: dict | None) -> tuple:
    u = (resp or {}).get('usage') or {}
    return u.get('prompt_tokens', u.get('input_tokens')), u.get('completion_tokens', u.get('output_tokens'))

def _as_dict(payload, path: str) -> dict | None:
    if payload is None: return None
    if isinstance(payload, str):
        try: payload = json.loads(payload)
        except ValueError as e: raise ValidationError(f"{path}: a string payload must be JSON ({e})") from None
    payload = _jsonable(payload)
    if not isinstance(payload, dict): raise ValidationError(f"{path}: must be a JSON object, got {type(payload).__name__}")
    return payload

def _report(self: LogStore, requested_at=None, received_at=None, req_payload=None, resp_payload=None,
            status_code: int | None = None, error_message: str | None = None, tags: dict | None = None,
            metadata: dict | None = None, source: str = 'report') -> str:
    req = _as_dict(req_payload, 'req_payload')
    resp = _as_dict(resp_payload, 'resp_payload')
    if status_code is not None and (isinstance(status_code, bool) or not isinstance(status_code, int)):
        raise ValidationError(f"status_code: must be an integer HTTP status, got {status_code!r}")
    if error_message is not None and not isinstance(error_message, str):
        raise ValidationError(f"error_message: must be a string, got {type(error_message).__name__}")
    merged = _check_tags((req or {}).get('metadata'), 'req_payload.metadata')
    merged |= _check_tags(metadata, 'metadata') | _check_tags(tags, 'tags')
    if status_code is None: status_code = 200 if resp is not None and error_message is None else None
    pt, ct = _usage(resp)
    return self.record(model=(req or {}).get('model') or (resp or {}).get('model'), req_payload=req, resp_payload=resp,
                       status_code=status_code, error_message=error_message,
                       requested_at=_ms(requested_at, 'requested_at'), received_at=_ms(received_at, 'received_at'),
                       tags=merged, completion_id=(resp or {}).get('id'), source=source, prompt_tokens=pt,
                       completion_tokens=ct, stream=bool((req or {}).get('stream')),
                       duration_ms=(int(received_at - requested_at) if isinstance(requested_at, (int, float))
                                    and isinstance(received_at, (int, float)) else None))

@patch
def report(self: LogStore, requested_at=None,  # ms since epoch (or datetime) when the request was sent
           received_at=None,  # ms since epoch (or datetime) when the response arrived
           req_payload=None,  # the chat.completions request body (dict, JSON text)
           resp_payload=None,  # the response (dict, JSON text, or the SDK's ChatCompletion)
           status_code: int | None = None,  # HTTP status; 200 assumed when a response and no error are given
           error_message: str | None = None,  # what went wrong, for failed calls
           tags: dict | None = None,  # deprecated: use req_payload["metadata"]
           metadata: dict | None = None,  # extra string->string tags
          ) -> str:
    "Record a call made elsewhere, as the hosted `/report` endpoint does; returns the log id."
    return _report(self, requested_at, received_at, req_payload, resp_payload, status_code, error_message, tags, metadata)

@patch
def report_anthropic(self: LogStore, requested_at=None, received_at=None, req_payload=None, resp_payload=None,
                     status_code: int | None = None, error_message: str | None = None, tags: dict | None = None,
                     metadata: dict | None = None) -> str:
    "Record an Anthropic Messages API call (`/report-anthropic`); stored in OpenAI chat shape so datasets can use it."
    req, resp = _as_dict(req_payload, 'req_payload'), _as_dict(resp_payload, 'resp_payload')
    if req is not None and not isinstance(req.get('messages', []), list):
        raise ValidationError("req_payload.messages: must be a list of Anthropic messages")
    from openpipe_lab import providers  # translation lives with the Anthropic route
    meta = (req or {}).get('metadata') or {}
    oreq = providers.anthropic_request_to_openai(req) if req is not None else None
    oresp = providers.anthropic_response_to_openai(resp) if resp is not None else None
    if oreq is not None:
        oreq['metadata'] = {k: v for k, v in meta.items() if k != 'user_id'} or None
        if oreq['metadata'] is None: oreq.pop('metadata')
        if req.get('model') and not str(req['model']).startswith('anthropic:'): oreq['model'] = f"anthropic:{req['model']}"
    return _report(self, requested_at, received_at, oreq, oresp, status_code, error_message, tags, metadata,
                   source='report_anthropic')


# %% [md]
# ## Queries
#
# `logs.filter(...)` returns a `LogQuery`: a lazy, immutable description of which logs you mean. Keyword
# arguments name a field (`model`, `completion_id`, `status_code`, `provider`, `cache_hit`, `source`) or else a
# metadata tag; the spec's `"metadata.name"` spelling works too (and is how you reach a tag that shares a
# field's name). `since`/`until` bound the time of the request (ms or datetime); `contains` finds text anywhere
# in the request or response. A tag value of `None` matches logs *without* that tag. Filters AND together, and
# `q.filter(...)` narrows further.
#
# Reading a query first flushes the store's own writer, so a notebook sees what it just logged.

# %%
#| export
_FIELDS = {'model', 'completion_id', 'status_code', 'provider', 'cache_hit', 'source', 'stream', 'parent_id', 'id'}
_FIELD_ALIASES = {'completionId': 'completion_id', 'statusCode': 'status_code'}

class LogQuery:
    "A lazy, filterable view of a lab's request logs."
    def __init__(self, store: LogStore, conditions: tuple = (), description: tuple = ()):
        self.store, self._conditions, self._description = store, tuple(conditions), tuple(description)

    def filter(self, since=None,  # only logs requested at/after this (ms or datetime)
               until=None,  # only logs requested before this (ms or datetime)
               contains: str | None = None,  # text that must appear in the request or the response
               **equals) -> 'LogQuery':  # field or metadata tag (also as "metadata.name") = value
        "A narrower query: every condition here ANDed with the existing ones."
        t, conds, desc = tables.logs, list(self._conditions), list(self._description)
        when = sa.func.coalesce(t.c.requested_at, t.c.created_at)
        if since is not None: conds.append(when >= _ms(since, 'since')); desc.append(f"since={since}")
        if until is not None: conds.append(when < _ms(until, 'until')); desc.append(f"until={until}")
        if contains is not None:
            if not isinstance(contains, str) or not contains: raise ConfigError("contains= must be a non-empty string")
            pat = '%' + contains.replace('\\', '\\\\').replace('%', '\\%').replace('_', '\\_') + '%'
            conds.append(sa.or_(t.c.req_payload.like(pat, escape='\\'), t.c.resp_payload.like(pat, escape='\\')))
            desc.append(f"contains={contains!r}")
        for key, value in equals.items():
            conds.append(self._condition(key, value)); desc.append(f"{key}={value!r}")
        return LogQuery(self.store, conds, desc)

    @staticmethod
    def _condition(key: str, value):
        t, tt = tables.logs, tables.log_tags
        key = _FIELD_ALIASES.get(key, key)
        if key in _FIELDS and not key.startswith('metadata.'):
            return t.c[key].is_(None) if value is None else t.c[key] == value
        name = key[len('metadata.'):] if key.startswith('metadata.') else key
        if not name: raise ConfigError("filter: 'metadata.' needs a tag name, e.g. filter(**{'metadata.prompt_id': 'pii'})")
        has = sa.select(tt.c.log_id).where(tt.c.key == name)
        if value is None: return t.c.id.not_in(has)
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"filter: tag {name!r} must be compared with a string, got {type(value).__name__}")
        value = value if isinstance(value, str) else json.dumps(value)
        return t.c.id.in_(has.where(tt.c.value == value))

    def _where(self, stmt):
        return stmt.where(*self._conditions) if self._conditions else stmt

    def __len__(self) -> int:
        self.store.flush()
        with self.store.db.connect() as c:
            return c.execute(self._where(sa.select(sa.func.count()).select_from(tables.logs))).scalar_one()

    def count(self) -> int:
        "How many logs match."
        return len(self)

    def __iter__(self):
        "Matching logs as dicts (payloads and tags decoded), oldest first, read in batches."
        self.store.flush()
        t, last = tables.logs, None
        while True:
            stmt = self._where(sa.select(t)).order_by(t.c.id).limit(1000)
            if last is not None: stmt = stmt.where(t.c.id > last)
            with self.store.db.connect() as c: rows = c.execute(stmt).mappings().all()
            if not rows: return
            for r in rows:
                d = dict(r)
                for k in ('req_payload', 'resp_payload', 'tags'): d[k] = loads(d[k])
                d['tags'] = d['tags'] or {}
                yield d
            last = rows[-1]['id']

    def ids(self) -> list[str]:
        "The ids of matching logs, oldest first."
        self.store.flush()
        with self.store.db.connect() as c:
            return list(c.execute(self._where(sa.select(tables.logs.c.id)).order_by(tables.logs.c.id)).scalars())

    def latest(self, n: int = 5) -> 'pd.DataFrame':
        "The `n` most recent matching logs as a DataFrame (newest first)."
        self.store.flush()
        t = tables.logs
        with self.store.db.connect() as c:
            rows = c.execute(self._where(sa.select(t)).order_by(t.c.id.desc()).limit(n)).mappings().all()
        return _frame(rows)

    @property
    def df(self) -> 'pd.DataFrame':
        "All matching logs as a pandas DataFrame, one row per log, one column per tag (`tag.<name>`)."
        return _frame(list(self))

    def __repr__(self): return f"LogQuery({', '.join(self._description) or 'all'})"

    def _repr_markdown_(self):
        n = len(self)
        head = f"**LogQuery** ({', '.join(self._description) or 'all logs'}): {n} log{'s' * (n != 1)}"
        if not n: return head
        cols = ['model', 'status_code', 'completion_id', 'tags', 'duration_ms']
        rows = self.latest(5)
        lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
        for _, r in rows.iterrows():
            tags = ', '.join(f"{k[4:]}={v}" for k, v in r.items() if k.startswith('tag.') and isinstance(v, str))
            vals = [r['model'], r['status_code'], r['completion_id'], tags, r['duration_ms']]
            lines.append('| ' + ' | '.join('' if v is None or v != v else str(v) for v in vals) + ' |')
        return head + ' (latest 5)\n\n' + '\n'.join(lines)

def _frame(rows):
    import pandas as pd
    out = []
    for r in rows:
        d = dict(r)
        for k in ('req_payload', 'resp_payload', 'tags'):
            if isinstance(d.get(k), str): d[k] = loads(d[k])
        d['tags'] = d.get('tags') or {}
        out.append(d)
    df = pd.DataFrame(out, columns=list(_LOG_COLS) if not out else None)
    if 'tags' in df: df = df.drop(columns=['tags']).join(pd.DataFrame([{f"tag.{k}": v for k, v in (d['tags'] or {}).items()} for d in out], index=df.index))
    return df

@patch
def filter(self: LogStore, since=None, until=None, contains: str | None = None, **equals) -> LogQuery:
    "Logs matching every condition (see `LogQuery.filter`)."
    return LogQuery(self).filter(since=since, until=until, contains=contains, **equals)

@patch
def all(self: LogStore) -> LogQuery:
    "Every log in the lab."
    return LogQuery(self)

@patch
def __len__(self: LogStore) -> int: return len(LogQuery(self))

# %% [md]
# ### Export and metadata updates
#
# `export(path)` writes the hosted product's request-log export: one JSON object per line with `input` (the
# chat request), `output` (the response, or the error) and `tags`. `update_metadata(**tags)` follows
# `/logs/update-metadata`: every log the query matches gets the given tags set, a value of `None` deletes that
# tag, and the number of matched logs is returned. It runs in one transaction, so a failure changes nothing.

# %%
#| export
@patch
def export(self: LogQuery, path: str | Path  # where to write the JSONL file
          ) -> int:
    "Write matching logs as JSONL `{input, output, tags}` lines; returns the number written."
    path, n = Path(path), 0
    tmp = path.with_name(path.name + '.partial')
    with open(tmp, 'w', encoding='utf-8') as f:
        for r in self:
            out = r['resp_payload']
            if out is None or r['error_message']:
                out = {'error': {'message': r['error_message'], 'status_code': r['status_code']}} | ({'response': out} if out else {})
            f.write(json.dumps({'input': r['req_payload'], 'output': out, 'tags': r['tags']}, ensure_ascii=False) + '\n')
            n += 1
    tmp.replace(path)
    return n

@patch
def update_metadata(self: LogQuery, **tags) -> int:
    "Set (or, with `None`, delete) metadata tags on every matching log; returns how many logs matched."
    problems = [f"{k}: must be a string or None, got {type(v).__name__}" for k, v in tags.items() if v is not None and not isinstance(v, str)]
    if problems: raise ValidationError("update_metadata: invalid tag values", problems)
    if not tags: raise ConfigError("update_metadata needs at least one tag, e.g. q.update_metadata(relabel='true')")
    self.store.flush()
    t, tt = tables.logs, tables.log_tags
    with self.store.db.begin() as c:
        rows = c.execute(self._where(sa.select(t.c.id, t.c.tags))).all()
        ids = [r[0] for r in rows]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            c.execute(tt.delete().where(tt.c.log_id.in_(chunk), tt.c.key.in_(list(tags))))
        new_rows, updates = [], []
        for id_, tag_text in rows:
            cur = (loads(tag_text) or {})
            for k, v in tags.items():
                if v is None: cur.pop(k, None)
                else: cur[k] = v; new_rows.append({'log_id': id_, 'key': k, 'value': v})
            updates.append({'b_id': id_, 'b_tags': dumps(cur) if cur else None})
        if new_rows: c.execute(tt.insert(), new_rows)
        if updates: c.execute(t.update().where(t.c.id == sa.bindparam('b_id')).values(tags=sa.bindparam('b_tags')), updates)
    return len(ids)

@patch
def to_dataset(self: LogQuery, name: str  # name of the new dataset
              ):
    "A new `Dataset` named `name` from the successful calls in this query (see `Dataset.from_logs`)."
    from openpipe_lab.dataset import Dataset
    return Dataset.from_logs(self, name)

# %% [md]
# ## Providers, clients and datasets from the store
#
# A lab knows its custom OpenAI-compatible providers (`openpipe:<provider>/<model>` routes to them). Only the
# *name* of the environment variable holding the key is stored, never the key. The drop-in clients and datasets
# are defined in later notebooks; these methods are the short way to reach them from a store.

# %%
#| export
@patch
def add_provider(self: LogStore, name: str,  # used in model ids: openpipe:<name>/<model>
                 base_url: str,  # the provider's OpenAI-compatible base URL (for azure: the resource endpoint)
                 api_key_env: str | None = None,  # name of the environment variable holding its API key
                 kind: str = 'openai',  # 'openai' (any OpenAI-compatible server) or 'azure'
                 **config) -> dict:  # extra settings, e.g. api_version for azure
    "Register (or replace) a custom provider; returns its record."
    check_slug(name, 'provider name')
    if kind not in ('openai', 'azure'): raise ConfigError(f"add_provider: kind must be 'openai' or 'azure', got {kind!r}")
    if not isinstance(base_url, str) or not base_url.startswith(('http://', 'https://')):
        raise ConfigError(f"add_provider: base_url must be an http(s) URL, got {base_url!r}")
    if 'api_key' in config: raise ConfigError("add_provider: API keys are never stored; put the key in an environment variable and pass its name as api_key_env=")
    if api_key_env is not None and not (isinstance(api_key_env, str) and api_key_env.replace('_', '').isalnum()):
        raise ConfigError(f"add_provider: api_key_env must be an environment variable name, got {api_key_env!r}")
    row = dict(name=name, base_url=base_url.rstrip('/'), api_key_env=api_key_env, kind=kind, config=dumps(config or None), created_at=now_ms())
    with self.db.begin() as c:
        c.execute(tables.providers.delete().where(tables.providers.c.name == name))
        c.execute(tables.providers.insert().values(**row))
    return row | {'config': config}

@patch
def providers(self: LogStore) -> list[dict]:
    "The custom providers registered in this lab."
    with self.db.connect() as c:
        return [dict(r) | {'config': loads(r['config']) or {}} for r in c.execute(sa.select(tables.providers).order_by(tables.providers.c.name)).mappings()]

@patch
def openai(self: LogStore, **kwargs):
    "A drop-in `openai.OpenAI` that records every call in this lab (see the client notebook)."
    from openpipe_lab.client import OpenAI
    return OpenAI(store=self, **kwargs)

@patch
def async_openai(self: LogStore, **kwargs):
    "A drop-in `openai.AsyncOpenAI` that records every call in this lab."
    from openpipe_lab.client import AsyncOpenAI
    return AsyncOpenAI(store=self, **kwargs)

@patch
def dataset(self: LogStore, name: str):
    "Open the dataset called `name` in this lab."
    from openpipe_lab.dataset import Dataset
    return Dataset.open(name, store=self)

@patch
def _repr_markdown_(self: LogStore):
    return f"**LogStore** `{self.db._safe_url()}` — artifacts in `{self.dir}`\n\n" + LogQuery(self)._repr_markdown_()

# %% [md]
# ## A tour
#
# A temporary lab, three calls reported the way an application would (one failed), then the queries.

# %%
lab = tempfile.mkdtemp()
logs = LogStore(f"{lab}/lab.db")
t0 = 1_700_000_000_000
def call(text, answer, prompt_id, model='gpt-4o-mini', t=t0, **kw):
    req = {'model': model, 'messages': [{'role': 'user', 'content': text}], 'metadata': {'prompt_id': prompt_id}}
    resp = {'id': 'chatcmpl-' + text.split()[1], 'object': 'chat.completion', 'created': t // 1000, 'model': model,
            'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': answer}, 'finish_reason': 'stop'}],
            'usage': {'prompt_tokens': 9, 'completion_tokens': 3, 'total_tokens': 12}}
    return logs.report(requested_at=t, received_at=t + 250, req_payload=req, resp_payload=resp, **kw)
call('Redact: Call Ann at 555-0100', 'Call [NAME] at [PHONE]', 'pii')
call('Redact: Bob lives in Paris', '[NAME] lives in [CITY]', 'pii', t=t0 + 1000, metadata={'user': 'u1'})
logs.report(requested_at=t0 + 2000, received_at=t0 + 2100, status_code=429, error_message='rate limited',
            req_payload={'model': 'gpt-4o', 'messages': [{'role': 'user', 'content': 'Summarise: ...'}], 'metadata': {'prompt_id': 'summary'}})
logs

# %%
test_eq(len(logs), 3)
test_eq(len(logs.filter(prompt_id='pii')), 2)
test_eq(len(logs.filter(**{'metadata.prompt_id': 'pii'}, model='gpt-4o-mini')), 2)
test_eq(len(logs.filter(status_code=429)), 1)
test_eq(len(logs.filter(user=None)), 2)                      # logs without a `user` tag
test_eq(len(logs.filter(contains='Paris')), 1)
test_eq(len(logs.filter(contains='[NAME]')), 2)              # responses are searched too
test_eq(len(logs.filter(contains='100%')), 0)                # LIKE wildcards are escaped
test_eq(len(logs.filter(since=t0 + 500, until=t0 + 1500)), 1)
test_eq(len(logs.filter(prompt_id='pii').filter(user='u1')), 1)
r = next(iter(logs.filter(user='u1')))
test_eq((r['tags'], r['completion_id'], r['prompt_tokens'], r['duration_ms']), ({'prompt_id': 'pii', 'user': 'u1'}, 'chatcmpl-Bob', 9, 250))
test_eq(r['req_payload']['messages'][0]['content'], 'Redact: Bob lives in Paris')

# %% [md]
# `.df` is a plain DataFrame with one `tag.<name>` column per tag, ready for pandas:

# %%
df = logs.all().df
test_eq(list(df['tag.prompt_id']), ['pii', 'pii', 'summary'])
df[['model', 'status_code', 'completion_id', 'tag.prompt_id', 'tag.user']]

# %% [md]
# The export matches the hosted product's format; the failed call exports its error as the output:

# %%
n = logs.all().export(f"{lab}/logs.jsonl")
lines = [json.loads(l) for l in open(f"{lab}/logs.jsonl")]
test_eq(n, 3)
test_eq(sorted(lines[0]), ['input', 'output', 'tags'])
test_eq(lines[0]['output']['choices'][0]['message']['content'], 'Call [NAME] at [PHONE]')
test_eq(lines[2]['output']['error'], {'message': 'rate limited', 'status_code': 429})

# %% [md]
# Updating metadata: the returned count is the number of logs matched; `None` deletes a tag.

# %%
test_eq(logs.filter(prompt_id='pii').update_metadata(relabel='true'), 2)
test_eq(len(logs.filter(relabel='true')), 2)
test_eq(logs.filter(prompt_id='pii', user='u1').update_metadata(user=None), 1)
test_eq(len(logs.filter(user='u1')), 0)
test_eq(next(iter(logs.filter(completion_id='chatcmpl-Bob')))['tags'], {'prompt_id': 'pii', 'relabel': 'true'})
test_eq(logs.filter(prompt_id='nothing').update_metadata(x='1'), 0)

# %% [md]
# ## Bad input
#
# Every problem is reported with the field it is in, and nothing is written.

# %%
bad_meta = {'model': 'm', 'messages': [], 'metadata': {'user_id': 123, 'ok': 'x', 'nested': {'a': 1}}}
test_fail(lambda: logs.report(req_payload=bad_meta), contains='req_payload.metadata.nested: must be a string')
test_fail(lambda: logs.report(req_payload='{not json'), contains='req_payload: a string payload must be JSON')
test_fail(lambda: logs.report(req_payload={'model': 'm'}, requested_at='yesterday'), contains='requested_at: must be a Unix timestamp')
test_fail(lambda: logs.report(req_payload={'model': 'm'}, status_code='200'), contains='status_code: must be an integer')
test_fail(lambda: logs.filter(prompt_id='pii').update_metadata(n=1), contains='n: must be a string or None')
test_eq(len(logs), 3)

# %% [md]
# Deprecated `tags=` still works: numbers and booleans become strings, `None` values are dropped.

# %%
logs.report(req_payload={'model': 'm', 'messages': []}, tags={'n': 3, 'flag': True, 'gone': None})
test_eq(next(iter(logs.filter(model='m')))['tags'], {'n': '3', 'flag': 'true'})

# %% [md]
# Providers store the name of the key's environment variable, never a key:

# %%
logs.add_provider('custom-azure', base_url='https://example.openai.azure.com/', api_key_env='AZURE_KEY', kind='azure', api_version='2024-06-01')
test_eq([(p['name'], p['base_url'], p['api_key_env'], p['config']) for p in logs.providers()],
        [('custom-azure', 'https://example.openai.azure.com', 'AZURE_KEY', {'api_version': '2024-06-01'})])
test_fail(lambda: logs.add_provider('x', 'https://h', api_key='sk-123'), contains='API keys are never stored')
test_fail(lambda: logs.add_provider('x', 'ftp://h'), contains='base_url must be an http(s) URL')

# %% [md]
# ## The writer under load
#
# `record` is what the drop-in clients call: it enqueues and returns at once. Ten thousand records, then one
# `flush()`, and all of them are queryable — each with its tags.

# %%
ids = [logs.record(model='bulk', req_payload={'model': 'bulk', 'messages': [{'role': 'user', 'content': str(i)}]},
                   resp_payload={'id': f'c{i}'}, status_code=200, tags={'batch': str(i % 3)}) for i in range(10_000)]
logs.flush()
test_eq(len(logs.filter(model='bulk')), 10_000)
test_eq(len(logs.filter(model='bulk', batch='1')), 3333)
test_eq(len(set(ids)), 10_000)

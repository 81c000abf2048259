# %%
#| default_exp dataset

# %% [md]
# # Dataset
#
# > Training data kept in the lab database: import JSONL files, request logs or HF datasets with every bad line
# > reported, deterministic train/test splits, relabeling through any routed model, pruning rules, export and
# > content snapshots.

# %%
#| export
from __future__ import annotations
import hashlib, json, sys, warnings
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_COMPLETED
import sqlalchemy as sa
from fastcore.basics import patch
from openpipe_lab.core import *
from openpipe_lab.store import tables, dumps, loads
from openpipe_lab.formats import (Problem, read_jsonl, validate_entry, functions_to_tools, content_hash,
                                  apply_pruning_rules, split_output)
from openpipe_lab.logstore import LogStore, get_store

# %%
#| hide
from fastcore.test import *
import tempfile, os

# %% [md]
# ## What a dataset is
#
# A dataset is a named, ordered list of *entries*, each one training example in the format of the hosted product's
# "Uploading Data" page (the OpenAI chat fine-tuning format plus a few fields):
#
# | field | what it holds |
# |---|---|
# | `messages` | the conversation, **ending with the assistant message that is the output** to learn |
# | `tools`, `tool_choice`, `response_format` | the request parameters the output was produced under (optional) |
# | `split` | `TRAIN` or `TEST`; assigned automatically when absent |
# | `rejected_message` | a worse assistant output, for preference training (DPO) (optional) |
# | `metadata` | string → string labels, e.g. `{"prompt_id": "pii"}` (optional) |
#
# The lab also keeps, per entry, its **provenance** (`UPLOAD`, `REQUEST_LOG`, `RELABELED_BY_MODEL`,
# `RELABELED_BY_HUMAN`), the **log id** it came from (for entries imported from request logs) and the **history**
# of outputs it replaced. Everything lives in the lab database (tables `datasets`, `dataset_entries`,
# `pruning_rules`), so a dataset built in a notebook is visible to a script, a training worker or a colleague's
# notebook on the same lab, and survives a kernel restart.
#
# The whole workflow in one glance (each step is a section below):
#
# ```python
# ds = Dataset.from_jsonl("capitals.jsonl", "capitals")       # or logs.filter(prompt_id="x").to_dataset("capitals")
# ds.errors                                                  # every rejected line: line number, field, message
# ds.relabel("gpt-4o", concurrency=8)                        # optional: better outputs from a stronger model
# ds.add_pruning_rule("You are a helpful assistant...")      # optional: drop static prompt text from training inputs
# ds.review()                                                # read, edit, re-split, delete in a widget
# ds.snapshot()                                              # the content hash a fine-tune records
# ft = FineTune(ds, base_model=..., slug="capitals-ft")     # trains on ds.rows("TRAIN"); evals use ds.test
# ```
#
# This notebook is a tutorial: each section shows one thing you do with a dataset, then the code that does it.
# We work in a throw-away lab (a temporary directory); in your own work you would leave `store=` out and use the
# default lab in `./.openpipe_lab/`.

# %%
lab = tempfile.mkdtemp()
logs = LogStore(f"{lab}/lab.db")

# %% [md]
# ## Constants and small helpers
#
# The spec fixes the vocabulary: two `SPLITS`, four `PROVENANCES`, and at most `MAX_ENTRIES_PER_CALL` (100)
# entries per `add_entries` call (the `/datasets/{id}/entries` limit). The `CONTENT_FIELDS` of an entry (what a
# model is trained on, plus the metadata labels) are hashed into `entry_hash`; provenance, history and ids are
# bookkeeping and are not. `ROW_FIELDS` (content plus `split`) is what a training row and an export line carry.

# %%
#| export
SPLITS = ('TRAIN', 'TEST')
PROVENANCES = ('REQUEST_LOG', 'UPLOAD', 'RELABELED_BY_MODEL', 'RELABELED_BY_HUMAN')
MAX_ENTRIES_PER_CALL = 100  # the hosted `/datasets/{id}/entries` limit
CONTENT_FIELDS = ('messages', 'tools', 'tool_choice', 'response_format', 'rejected_message', 'metadata')
ROW_FIELDS = CONTENT_FIELDS + ('split',)  # what a training row / an export line carries
_BATCH = 1000  # entries per insert transaction and per read page
_ENTRY_JSON = ('messages', 'tools', 'tool_choice', 'response_format', 'rejected_message', 'metadata', 'history')

def _entry_hash(entry: dict) -> str:
    "Content hash of an entry's training content (not its split, provenance or history)."
    return content_hash({k: entry.get(k) for k in CONTENT_FIELDS})

def _test_score(entry_hash: str, seed: int = 0) -> float:
    "A number in [0, 1) derived from the entry's content hash and `seed`: below `test_fraction` means TEST."
    h = entry_hash if seed == 0 else hashlib.sha256(f"{seed}:{entry_hash}".encode()).hexdigest()
    return int(h[:13], 16) / 16 ** 13

def _check_split(split, what='split') -> str:
    if split not in SPLITS: raise ConfigError(f"{what} must be 'TRAIN' or 'TEST', got {split!r}")
    return split

# %%
test_eq(ROW_FIELDS[-1], 'split')
test_eq(_entry_hash({'messages': [], 'split': 'TEST'}), _entry_hash({'messages': [], 'split': 'TRAIN'}))  # split is not content
assert 0 <= _test_score('f' * 64) < 1 and _test_score('0' * 64) == 0

# %% [md]
# ## Creating, opening, listing, deleting
#
# A dataset is addressed by its name, unique in a lab (like a slug: lowercase letters, digits, `.`, `_`, `-`), so
# code can say `Dataset.open("pii-v1")` in any process. `Dataset.list()` mirrors the hosted `GET /datasets`: one
# row per dataset with its entry count and how many fine-tunes were trained on it.

# %%
#| export
def _entry_from_row(r) -> dict:
    d = dict(r)
    for k in _ENTRY_JSON:
        if k in d: d[k] = loads(d[k])
    return d

class Dataset:
    "A named dataset of chat entries stored in a lab (see the module docs for the entry fields)."
    def __init__(self, id: str, name: str, store: LogStore | None = None):
        "Bind to an existing dataset row; use `Dataset.create`/`open`/`from_*` instead of calling this."
        self.id, self.name, self.store = id, name, get_store(store)
        self.errors: list[Problem] = []  # problems found by the last import (line/entry, field path, message)

    @property
    def db(self): return self.store.db

    @classmethod
    def create(cls, name: str,  # unique in the lab: lowercase letters, digits, '.', '_', '-'
               store: LogStore | None = None) -> Dataset:
        "Create a new empty dataset; `AlreadyExistsError` if the name is taken."
        check_slug(name, 'dataset name')
        store = get_store(store)
        t, now, id = tables.datasets, now_ms(), new_id('ds')
        try:
            with store.db.begin() as c:
                if c.execute(sa.select(t.c.id).where(t.c.name == name)).first() is not None: raise AlreadyExistsError(name)
                c.execute(t.insert().values(id=id, name=name, created_at=now, updated_at=now, config=dumps({})))
        except (AlreadyExistsError, sa.exc.IntegrityError):
            raise AlreadyExistsError(f"a dataset named {name!r} already exists in {store!r}: open it with "
                                     f"Dataset.open({name!r}), pick another name, or delete it first.") from None
        return cls(id, name, store)

    @classmethod
    def open(cls, name: str, store: LogStore | None = None) -> Dataset:
        "Open an existing dataset by name; `NotFoundError` (listing the names there are) if there is none."
        store = get_store(store)
        t = tables.datasets
        with store.db.connect() as c:
            row = c.execute(sa.select(t.c.id).where(t.c.name == name)).first()
            if row is None:
                names = c.execute(sa.select(t.c.name).order_by(t.c.name).limit(20)).scalars().all()
                raise NotFoundError(f"no dataset named {name!r} in {store!r}. "
                                    + (f"Datasets there: {', '.join(names)}." if names else "It has no datasets yet: create one with Dataset.create(name) or Dataset.from_jsonl(path, name)."))
        return cls(row[0], name, store)

    @staticmethod
    def list(store: LogStore | None = None) -> 'pd.DataFrame':
        "All datasets of a lab, as in `GET /datasets`: id, name, created, updated, dataset_entry_count, fine_tune_count."
        import pandas as pd
        store = get_store(store)
        d, e, m = tables.datasets, tables.dataset_entries, tables.models
        n_entries = sa.select(sa.func.count()).where(e.c.dataset_id == d.c.id).scalar_subquery()
        n_models = sa.select(sa.func.count()).where(m.c.dataset_id == d.c.id).scalar_subquery()
        stmt = sa.select(d.c.id, d.c.name, d.c.created_at.label('created'), d.c.updated_at.label('updated'),
                         n_entries.label('dataset_entry_count'), n_models.label('fine_tune_count')).order_by(d.c.name)
        with store.db.connect() as c: rows = c.execute(stmt).mappings().all()
        df = pd.DataFrame(rows, columns=['id', 'name', 'created', 'updated', 'dataset_entry_count', 'fine_tune_count'])
        for k in ('created', 'updated'): df[k] = pd.to_datetime(df[k], unit='ms', utc=True)
        return df

    def delete(self) -> dict:
        "Delete the dataset, its entries and pruning rules; returns the API's `{id, object, deleted}`."
        with self.db.begin() as c:
            c.execute(tables.dataset_entries.delete().where(tables.dataset_entries.c.dataset_id == self.id))
            c.execute(tables.pruning_rules.delete().where(tables.pruning_rules.c.dataset_id == self.id))
            n = c.execute(tables.datasets.delete().where(tables.datasets.c.id == self.id)).rowcount
        return {'id': self.id, 'object': 'dataset', 'deleted': bool(n)}

    def _config(self, c=None) -> dict:
        stmt = sa.select(tables.datasets.c.config).where(tables.datasets.c.id == self.id)
        if c is not None: row = c.execute(stmt).first()
        else:
            with self.db.connect() as c2: row = c2.execute(stmt).first()
        if row is None: raise NotFoundError(f"dataset {self.name!r} ({self.id}) no longer exists in {self.store!r}")
        return loads(row[0]) or {}

    def _set_config(self, c, **kw):
        cfg = self._config(c); cfg.update(kw)
        c.execute(tables.datasets.update().where(tables.datasets.c.id == self.id).values(config=dumps(cfg), updated_at=now_ms()))

    def _touch(self, c):
        n = c.execute(tables.datasets.update().where(tables.datasets.c.id == self.id).values(updated_at=now_ms())).rowcount
        if not n: raise NotFoundError(f"dataset {self.name!r} ({self.id}) no longer exists in {self.store!r}")

    def count(self, split: str | None = None,  # only this split
              provenance: str | None = None,  # only this provenance
              metadata: dict | None = None  # only entries whose metadata has these key/value pairs
             ) -> int:
        "The number of entries, optionally of one split / provenance / with some metadata."
        with self.db.connect() as c:
            return c.execute(self._filter(sa.select(sa.func.count()).select_from(tables.dataset_entries),
                                          split, provenance, metadata)).scalar()

    def __len__(self) -> int: return self.count()

    def _filter(self, stmt, split=None, provenance=None, metadata=None, ids=None):
        e = tables.dataset_entries
        stmt = stmt.where(e.c.dataset_id == self.id)
        if split is not None: stmt = stmt.where(e.c.split == _check_split(split))
        if provenance is not None:
            if provenance not in PROVENANCES: raise ConfigError(f"provenance must be one of {', '.join(PROVENANCES)}, got {provenance!r}")
            stmt = stmt.where(e.c.provenance == provenance)
        for k, v in (metadata or {}).items():
            # metadata is stored as compact JSON (`dumps`), so a label is the exact substring `"k":"v"`
            stmt = stmt.where(e.c.metadata.contains(dumps({k: v})[1:-1], autoescape=True))
        if ids is not None: stmt = stmt.where(e.c.id.in_(list(ids)))
        return stmt

    def _rule_rows(self, c=None):
        r = tables.pruning_rules
        stmt = sa.select(r.c.id, r.c.text).where(r.c.dataset_id == self.id).order_by(r.c.position, r.c.created_at)
        if c is not None: return c.execute(stmt).all()
        with self.db.connect() as c2: return c2.execute(stmt).all()

    @property
    def pruning_rules(self) -> list[str]:
        "The pruning rules' texts, in order (see `add_pruning_rule`)."
        return [t for _, t in self._rule_rows()]

    def __repr__(self):
        n, test = self.count(), self.count(split='TEST')
        rules = len(self.pruning_rules)
        return (f"Dataset({self.name!r}: {n} entr{'y' if n == 1 else 'ies'}, {n - test} train / {test} test"
                + (f", {rules} pruning rule{'s' * (rules != 1)}" if rules else '') + ')')

    def _repr_markdown_(self): return f"**{self!r}**"

    def __eq__(self, other): return isinstance(other, Dataset) and other.id == self.id and other.store.url == self.store.url
    def __hash__(self): return hash((self.store.url, self.id))

# %% [md]
# `__init__` only binds to a row; the class methods are the ways in. Creating a name that exists is refused with the
# fix, opening one that doesn't lists what there is:

# %%
ds = Dataset.create('capitals', store=logs)
ds

# %%
test_eq(Dataset.open('capitals', store=logs).id, ds.id)
test_fail(lambda: Dataset.create('capitals', store=logs), contains="a dataset named 'capitals' already exists")
test_fail(lambda: Dataset.open('capitols', store=logs), contains="Datasets there: capitals")
test_fail(lambda: Dataset.create('Capitals!', store=logs), contains="invalid dataset name")
test_eq(len(ds), 0)

# %% [md]
# ## Adding entries
#
# `add_entries` is the hosted `POST /datasets/{id}/entries`: up to 100 entries per call, each validated on its own.
# Valid entries are stored; each invalid one is reported with its index and every problem found in it (the whole
# call is never rejected because of one bad entry). The result has the API's shape, and the problems are also
# kept as `Problem` objects in `ds.errors`.
#
# What happens to each entry on the way in:
#
# * it is validated with `formats.validate_entry` (roles, tool calls with JSON arguments, tools, `tool_choice`,
#   `response_format`, `split`, `rejected_message`, string → string `metadata`; messages must end with an assistant
#   message);
# * deprecated `functions` / `function_call` are converted to `tools` / `tool_choice` / `tool_calls`;
# * fields that are not part of an entry (`temperature`, `model`, ...) are ignored, as the spec says;
# * an entry without a `split` gets one from the hash of its content (next section).

# %%
#| export
def _prepare(obj, line=None) -> tuple[dict | None, list[Problem]]:
    "Validate one raw entry; return (entry with only entry fields, deprecated fields converted, []) or (None, problems)."
    problems = validate_entry(obj, line=line)
    if problems: return None, problems
    obj = functions_to_tools(obj)  # a shallow copy; converts deprecated fields wherever they are (cheap when absent)
    entry = {k: obj.get(k) for k in ROW_FIELDS}
    if entry['metadata'] == {}: entry['metadata'] = None
    return entry, []

_INSERT_COLS = ('id', 'dataset_id', 'position', 'split', 'provenance', 'log_id', 'history', 'entry_hash', 'created_at',
                'updated_at') + CONTENT_FIELDS

class _Writer:
    "Validates and inserts entries for one dataset in batched transactions; collects problems."
    def __init__(self, ds: Dataset, provenance: str, batch_size: int = _BATCH):
        self.ds, self.provenance, self.batch_size = ds, provenance, batch_size
        self.rows, self.problems, self.written = [], [], 0
        e = tables.dataset_entries
        with ds.db.connect() as c:
            ds._config(c)  # raises if the dataset was deleted
            self.position = (c.execute(sa.select(sa.func.max(e.c.position)).where(e.c.dataset_id == ds.id)).scalar() or 0) + 1

    def add(self, obj, line=None, log_id=None, provenance=None) -> list[Problem]:
        "Validate `obj` and queue it for insertion; return its problems (nothing is queued when there are any)."
        entry, problems = _prepare(obj, line)
        if problems: return problems
        self.rows.append(self._row(entry, log_id, provenance or self.provenance))
        if len(self.rows) >= self.batch_size: self.flush()
        return []

    def _row(self, entry, log_id, provenance):
        h, now = _entry_hash(entry), now_ms()
        split = entry['split'] or ('TEST' if _test_score(h) < 0.1 else 'TRAIN')
        row = dict(id=new_id('dse'), dataset_id=self.ds.id, position=self.position, split=split, provenance=provenance,
                   log_id=log_id, history=None, entry_hash=h, created_at=now, updated_at=now)
        for k in CONTENT_FIELDS: row[k] = dumps(entry[k])
        self.position += 1
        return row

    def flush(self):
        if not self.rows: return
        with self.ds.db.begin() as c:
            self.ds._touch(c)
            ph = '?' if c.dialect.paramstyle == 'qmark' else '%s'  # driver-level executemany: ~5x less overhead
            c.exec_driver_sql(f"INSERT INTO dataset_entries ({', '.join(_INSERT_COLS)}) VALUES ({', '.join([ph] * len(_INSERT_COLS))})",
                              [tuple(r[k] for k in _INSERT_COLS) for r in self.rows])
        self.written += len(self.rows)
        self.rows = []

# %%
#| export
@patch
def add_entries(self: Dataset, entries: list  # up to 100 entry dicts (messages, tools, split, metadata, ...)
               ) -> dict:
    "Validate and add entries (the hosted `POST /datasets/{id}/entries`); invalid ones are listed, valid ones kept."
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError("entries must be a non-empty list of entry dicts")
    if len(entries) > MAX_ENTRIES_PER_CALL:
        raise ConfigError(f"add_entries takes at most {MAX_ENTRIES_PER_CALL} entries per call (the API's limit), got "
                          f"{len(entries)}: call it in batches, or use Dataset.from_jsonl / add_jsonl for bulk imports.")
    w, errors = _Writer(self, 'UPLOAD'), []
    for i, obj in enumerate(entries):
        problems = w.add(obj)
        if problems:
            errors.append({'object': 'dataset.entries.creation.error', 'entry_index': i, 'message': '; '.join(map(str, problems))})
            w.problems += [Problem(f"entries[{i}]" + (f".{p.path}" if p.path else ''), p.message) for p in problems]
    w.flush()
    self.errors = w.problems
    return {'object': 'dataset.entries.creation', 'entries_created': w.written, 'errors': {'object': 'list', 'data': errors}}


# %% [md]
# Three capitals and two mistakes: a conversation that ends with the user (no output to learn) and a metadata value
# that is a number instead of a string.

# %%
sys_msg = {'role': 'system', 'content': 'You are a helpful assistant. Answer with the city only.'}
def qa(country, city, **kw): return {'messages': [sys_msg, {'role': 'user', 'content': f'What is the capital of {country}?'},
                                                  {'role': 'assistant', 'content': city}], **kw}
result = ds.add_entries([
    qa('Tasmania', 'Hobart', rejected_message={'role': 'assistant', 'content': 'Paris'}, metadata={'prompt_id': 'capitals'}),
    qa('Sweden', 'Stockholm', split='TEST', temperature=0.2),
    {'messages': [sys_msg, {'role': 'user', 'content': 'What is the capital of Peru?'}]},
    qa('Japan', 'Tokyo', metadata={'prompt_id': 'capitals', 'difficulty': 1}),
    qa('Kenya', 'Nairobi', split='TRAIN', metadata={'prompt_id': 'capitals'}),
])
result

# %%
test_eq(result['entries_created'], 3)
test_eq([e['entry_index'] for e in result['errors']['data']], [2, 3])
test_eq(result['errors']['data'][1]['message'], 'metadata.difficulty: must be a string, got number (write it as "1")')
test_eq([str(p) for p in ds.errors][0][:60], "entries[2].messages: must end with an assistant message (the")
test_eq(len(ds), 3)
test_fail(lambda: ds.add_entries([qa('X', 'Y')] * 101), contains='at most 100 entries per call')

# %% [md]
# ## Reading entries
#
# `ds.df` is the whole dataset as a pandas DataFrame (one row per entry, in insertion order). For large datasets
# read in pages with `entries(offset, limit, ...)`, stream with `rows()` (below), or look at one entry with
# `entry(id)`. All of them accept the same filters: `split`, `provenance`, and `metadata` (a dict of key/value
# pairs that must all match).

# %%
#| export
_DF_COLUMNS = ['id', 'split', 'provenance', 'messages', 'tools', 'tool_choice', 'response_format', 'rejected_message',
               'metadata', 'log_id', 'history', 'entry_hash', 'position', 'created_at', 'updated_at']

@patch
def _iter_entries(self: Dataset, split=None, provenance=None, metadata=None, ids=None, page: int = _BATCH):
    "Entries as dicts in insertion order, read page by page (bounded memory, no long-lived read transaction)."
    e, last = tables.dataset_entries, None
    while True:
        stmt = self._filter(sa.select(*[e.c[k] for k in _DF_COLUMNS]), split, provenance, metadata, ids)
        if last is not None: stmt = stmt.where(e.c.position > last)
        with self.db.connect() as c: rows = c.execute(stmt.order_by(e.c.position).limit(page)).mappings().all()
        if not rows: return
        for r in rows: yield _entry_from_row(r)
        last = rows[-1]['position']

@patch
def entries(self: Dataset, offset: int = 0, limit: int | None = 20, split: str | None = None,
            provenance: str | None = None, metadata: dict | None = None) -> list[dict]:
    "A page of entries (dicts with every column), in insertion order, optionally filtered."
    e = tables.dataset_entries
    stmt = self._filter(sa.select(*[e.c[k] for k in _DF_COLUMNS]), split, provenance, metadata).order_by(e.c.position)
    stmt = stmt.offset(offset) if limit is None else stmt.offset(offset).limit(limit)
    with self.db.connect() as c: return [_entry_from_row(r) for r in c.execute(stmt).mappings()]

@patch
def entry(self: Dataset, entry_id: str) -> dict:
    "One entry by id, as a dict; `NotFoundError` if it is not in this dataset."
    with self.db.connect() as c: return self._get_entry(c, entry_id)

@patch
def _get_entry(self: Dataset, c, entry_id: str) -> dict:
    e = tables.dataset_entries
    row = c.execute(self._filter(sa.select(*[e.c[k] for k in _DF_COLUMNS]), ids=[entry_id])).mappings().first()
    if row is None: raise NotFoundError(f"no entry {entry_id!r} in dataset {self.name!r}")
    return _entry_from_row(row)

@patch
def _frame(self: Dataset, split=None) -> 'pd.DataFrame':
    import pandas as pd
    df = pd.DataFrame(list(self._iter_entries(split=split)), columns=_DF_COLUMNS)
    for k in ('created_at', 'updated_at'): df[k] = pd.to_datetime(df[k], unit='ms', utc=True)
    return df

@patch(as_prop=True)
def df(self: Dataset) -> 'pd.DataFrame':
    "All entries as a pandas DataFrame (one row per entry, insertion order)."
    return self._frame()

# %%
ds.df[['split', 'provenance', 'metadata']]

# %%
test_eq(list(ds.df.messages.str[-1].str['content']), ['Hobart', 'Stockholm', 'Nairobi'])
test_eq(ds.df.provenance.unique().tolist(), ['UPLOAD'])
test_eq([e['messages'][-1]['content'] for e in ds.entries(metadata={'prompt_id': 'capitals'})], ['Hobart', 'Nairobi'])
test_eq(ds.entries(offset=1, limit=1)[0]['split'], 'TEST')
test_eq(ds.entry(ds.df.id[0])['rejected_message'], {'role': 'assistant', 'content': 'Paris'})
test_fail(lambda: ds.entry('dse_nope'), contains="no entry 'dse_nope' in dataset 'capitals'")
test_eq(ds.count(split='TEST'), 1)

# %% [md]
# ## Importing a JSONL file
#
# `Dataset.from_jsonl(path, name)` creates a dataset from a file in the "Uploading Data" format (one JSON object per
# line); `ds.add_jsonl(path)` appends a file to an existing dataset. The file is *streamed*: lines are read,
# validated and written to the database in transactions of 1,000 entries, so a file of any size imports in bounded
# memory (the closing note has the figures for 100k rows). We set no size cap of our own.
#
# The rule is *nothing valid is dropped, nothing invalid slips in*: every valid line is imported, every invalid
# one lands in `ds.errors` as a `Problem` with its line number, the field path and the message. Lines that are
# not UTF-8 or not JSON are problems of their line, not of the whole file. A file with no valid line at all is
# refused with a `ValidationError` listing the problems, and no empty dataset is left behind.

# %%
#| export
@patch
def add_jsonl(self: Dataset, path: str | Path  # a .jsonl file in the "Uploading Data" format
             ) -> Dataset:
    "Append the valid lines of a JSONL file (streamed, batched); every invalid line is reported in `self.errors`."
    lines = read_jsonl(path)  # raises ConfigError for a missing path / a directory
    w, seen = _Writer(self, 'UPLOAD'), 0
    for line, obj in lines:
        seen += 1
        w.problems += [obj] if isinstance(obj, Problem) else w.add(obj, line=line)
    w.flush()
    self.errors = w.problems if seen else [Problem('', f"{path} is empty: no JSON lines to import")]
    return self

@patch(cls_method=True)
def from_jsonl(cls: Dataset, path: str | Path,  # a .jsonl file in the "Uploading Data" format
               name: str,  # name of the new dataset
               store: LogStore | None = None) -> Dataset:
    "A new dataset from a JSONL file; valid lines are imported, invalid ones listed in `.errors`."
    path = Path(path).expanduser()
    read_jsonl(path)  # a missing file is refused before the dataset is created
    ds = cls.create(name, store)
    try: ds.add_jsonl(path)
    except BaseException:
        ds.delete(); raise
    if len(ds) == 0:
        errors = ds.errors
        ds.delete()
        raise ValidationError(f"nothing to import from {path}: no valid entry ({len(errors)} problem{'s' * (len(errors) != 1)}); "
                              f"dataset {name!r} was not created", errors)
    return ds


# %% [md]
# A small file with one of each kind of mistake (it is also one of the fixtures the pytest suite uses):

# %%
bad = Path(lab) / 'nasty.jsonl'
tool = {'type': 'function', 'function': {'name': 'identify_capital', 'parameters': {'type': 'object', 'properties': {'capital': {'type': 'string'}}}}}
call = lambda args: {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': args}}]}
user = {'role': 'user', 'content': 'What is the capital of Tasmania?'}
bad.write_bytes(b'\n'.join([
    json.dumps({'messages': [user, call('{"capital": "Hobart"}')], 'tools': [tool]}).encode(),   # 1 ok
    b'{"messages": [{"role": "user", "content": "hi"}',                                        # 2 not JSON
    json.dumps({'messages': [user]}).encode(),                                                  # 3 no output
    json.dumps({'messages': [user, call('{capital: Hobart}')], 'tools': [tool]}).encode(),      # 4 bad arguments
    json.dumps({'messages': [user, {'role': 'assistant', 'content': 'Hobart'}], 'split': 'VALIDATION'}).encode(),  # 5
    json.dumps({'messages': [user, {'role': 'assistant', 'content': 'Hobart'}], 'metadata': {'n': 1}}).encode(),   # 6
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',                                 # 7 Latin-1, not UTF-8
    b'',                                                                                        # blank: skipped
    json.dumps({'messages': [{'role': 'user', 'content': 'Capital of Chile?'}, {'role': 'assistant', 'content': None}],
                'functions': [tool['function']], 'function_call': {'name': 'identify_capital'}}).encode(),  # 9 bad output
    json.dumps({'messages': [{'role': 'user', 'content': 'Capital of Chile?'},
                             {'role': 'assistant', 'content': None, 'function_call': {'name': 'identify_capital', 'arguments': '{"capital": "Santiago"}'}}],
                'functions': [tool['function']], 'function_call': {'name': 'identify_capital'}}).encode(),  # 10 ok, deprecated
]))
nasty = Dataset.from_jsonl(bad, 'nasty', store=logs)
print(nasty)
for p in nasty.errors: print(p)

# %%
test_eq(len(nasty), 2)
test_eq([p.line for p in nasty.errors], [2, 3, 4, 5, 6, 7, 9])
test_eq([p.path for p in nasty.errors][2:5], ['messages[1].tool_calls[0].function.arguments', 'split', 'metadata.n'])

# %% [md]
# Line 10 used the deprecated `functions` / `function_call` fields; it was imported with them converted to
# `tools`, `tool_choice` and an assistant `tool_calls` output:

# %%
e = nasty.entries()[-1]
test_eq(e['tools'], [tool])
test_eq(e['tool_choice'], {'type': 'function', 'function': {'name': 'identify_capital'}})
test_eq(e['messages'][-1]['tool_calls'][0]['function'], {'name': 'identify_capital', 'arguments': '{"capital": "Santiago"}'})
e['messages'][-1]

# %% [md]
# Files with nothing to import are refused without leaving a dataset behind; a missing file is refused before
# anything is created:

# %%
(Path(lab) / 'empty.jsonl').write_text('')
(Path(lab) / 'junk.jsonl').write_text('not json\n[1, 2]\n')
test_fail(lambda: Dataset.from_jsonl(Path(lab) / 'empty.jsonl', 'empty', store=logs), contains='is empty')
test_fail(lambda: Dataset.from_jsonl(Path(lab) / 'junk.jsonl', 'junk', store=logs), contains='line 2: must be a JSON object, got array')
test_fail(lambda: Dataset.from_jsonl(Path(lab) / 'missing.jsonl', 'missing', store=logs), contains='JSONL file not found')
test_eq(Dataset.list(store=logs).name.tolist(), ['capitals', 'nasty'])

# %% [md]
# ## Splits
#
# Training uses `TRAIN` entries and evaluation `TEST` ones. An entry imported without a split gets one from its
# content: the first bits of its content hash, read as a number in [0, 1), below 0.1 means `TEST`. That gives the
# hosted product's 90:10 target ratio, and it is *deterministic*: importing the same file again (or the same logs
# into another dataset) puts each entry in the same split, so a test entry never leaks into a later training set.
# An explicit `split` in the input is always kept.
#
# `split(test_fraction, seed)` re-assigns every entry. It ranks entries by a hash of (content, seed) and sends the
# lowest `round(n * test_fraction)` to `TEST`: the fraction is exact even for small datasets, the assignment is
# reproducible, and another `seed` draws another split. Re-assigning discards explicit splits from the input.
#
# `ds.train` and `ds.test` are *views*: they read the current entries of one split each time they are used, and
# support `len`, iteration (training rows), `df`, `entries`, `rows`, `to_jsonl`, `to_hf` and `snapshot`.

# %%
#| export
@patch
def split(self: Dataset, test_fraction: float = 0.1,  # share of entries that go to TEST
          seed: int = 0  # another seed draws another (reproducible) split
         ) -> Dataset:
    "Re-assign every entry to TRAIN/TEST: exactly `round(n * test_fraction)` TEST entries, chosen by hash of content and seed."
    if not (isinstance(test_fraction, (int, float)) and 0 <= test_fraction <= 1):
        raise ConfigError(f"test_fraction must be a number between 0 and 1, got {test_fraction!r}")
    e = tables.dataset_entries
    with self.db.connect() as c:
        rows = c.execute(sa.select(e.c.id, e.c.entry_hash).where(e.c.dataset_id == self.id)).all()
    ranked = sorted(rows, key=lambda r: (_test_score(r[1], seed), r[0]))
    n_test = round(len(rows) * test_fraction)
    test_ids = {r[0] for r in ranked[:n_test]}
    self.set_split([r[0] for r in rows if r[0] in test_ids], 'TEST')
    self.set_split([r[0] for r in rows if r[0] not in test_ids], 'TRAIN')
    return self

@patch
def set_split(self: Dataset, entry_ids: list | str,  # one entry id or several
              split: str  # 'TRAIN' or 'TEST'
             ) -> int:
    "Move entries to a split; returns how many were changed."
    _check_split(split)
    ids = [entry_ids] if isinstance(entry_ids, str) else list(entry_ids)
    e, n = tables.dataset_entries, 0
    with self.db.begin() as c:
        self._touch(c)
        for i in range(0, len(ids), 500):
            n += c.execute(e.update().where(e.c.dataset_id == self.id, e.c.id.in_(ids[i:i + 500]), e.c.split != split)
                           .values(split=split, updated_at=now_ms())).rowcount
    return n

class DatasetSplit:
    "A read-only view of one split of a dataset (`ds.train`, `ds.test`), read afresh on each use."
    def __init__(self, dataset: Dataset, split: str):
        self.dataset, self.split = dataset, _check_split(split)
    @property
    def name(self) -> str: return f"{self.dataset.name}:{self.split.lower()}"
    @property
    def store(self): return self.dataset.store
    def __len__(self): return self.dataset.count(split=self.split)
    def __iter__(self): return self.dataset.rows(split=self.split, apply_pruning=False)
    def rows(self, apply_pruning: bool = True): return self.dataset.rows(split=self.split, apply_pruning=apply_pruning)
    def entries(self, offset=0, limit=20, **kw): return self.dataset.entries(offset, limit, split=self.split, **kw)
    @property
    def df(self): return self.dataset._frame(split=self.split)
    def to_jsonl(self, path, apply_pruning: bool = False): return self.dataset.to_jsonl(path, split=self.split, apply_pruning=apply_pruning)
    def to_hf(self): return self.dataset.to_hf(split=self.split)
    def snapshot(self) -> str: return self.dataset.snapshot(split=self.split)
    def __repr__(self): return f"DatasetSplit({self.dataset.name!r}, {self.split}: {len(self)} entries)"
    def _repr_markdown_(self): return f"**{self!r}**"

@patch(as_prop=True)
def train(self: Dataset) -> DatasetSplit:
    "The TRAIN entries (a live view)."
    return DatasetSplit(self, 'TRAIN')

@patch(as_prop=True)
def test(self: Dataset) -> DatasetSplit:
    "The TEST entries (a live view)."
    return DatasetSplit(self, 'TEST')

# %% [md]
# 1,000 generated questions, imported without splits, land close to 90:10; re-importing them elsewhere gives the
# same assignment entry by entry; `split(0.2, seed=1)` gives exactly 200 test entries.

# %%
many = Path(lab) / 'many.jsonl'
with open(many, 'w') as f:
    for i in range(1000): f.write(json.dumps(qa(f'country #{i}', f'city #{i}')) + '\n')
big = Dataset.from_jsonl(many, 'many', store=logs)
again = Dataset.from_jsonl(many, 'many-again', store=logs)
big, big.test

# %%
assert 70 <= len(big.test) <= 130, len(big.test)
test_eq(len(big.train) + len(big.test), 1000)
test_eq(big.df.split.tolist(), again.df.split.tolist())
big.split(test_fraction=0.2, seed=1)
test_eq(len(big.test), 200)
test_ne(big.df.split.tolist(), again.df.split.tolist())
test_eq(big.split(0.2, seed=1).df.split.tolist(), big.df.split.tolist())
test_fail(lambda: big.split(1.5), contains='between 0 and 1')
test_eq(len(again.add_jsonl(many)), 2000)                              # add_jsonl appends to an existing dataset
test_eq(again.df.split.tolist()[:1000], again.df.split.tolist()[1000:])
test_fail(lambda: big.set_split(big.df.id[0], 'VALID'), contains="'TRAIN' or 'TEST'")

# %% [md]
# ## Editing entries
#
# Three mutators change entries one at a time or in bulk; the review widget (`06a_review`) calls nothing else:
#
# * `set_output(entry_id, message)` replaces the output (the final assistant message) with a new one, keeps the old
#   output in the entry's `history` and marks the entry `RELABELED_BY_HUMAN`. The new message is validated in the
#   context of the whole entry (a tool call with broken JSON arguments is refused). A plain string means
#   `{"role": "assistant", "content": <string>}`.
# * `set_split(entry_ids, split)` moves entries between splits (above).
# * `delete_entries(entry_ids)` removes entries.
#
# `set_metadata(entry_id, **labels)` sets or (with `None`) removes metadata labels.

# %%
#| export
def _output_message(message) -> dict:
    if isinstance(message, str): return {'role': 'assistant', 'content': message}
    if hasattr(message, 'model_dump'): message = message.model_dump(exclude_none=True)
    if not isinstance(message, dict): raise ConfigError(f"an output must be a string or an assistant message dict, got {type(message).__name__}")
    return message

@patch
def _replace_output(self: Dataset, c, entry: dict, message: dict, provenance: str, **history) -> dict:
    "Validate `entry` with `message` as output and write it (inside transaction `c`); return the new entry."
    new = {k: entry[k] for k in ROW_FIELDS}
    new['messages'] = entry['messages'][:-1] + [message]
    problems = validate_entry(new)
    if problems: raise ValidationError(f"the new output of entry {entry['id']} in dataset {self.name!r} is invalid", problems)
    old = {'output': entry['messages'][-1], 'provenance': entry['provenance'], 'replaced_at': now_ms(), **history}
    hist = (entry['history'] or []) + [old]
    e = tables.dataset_entries
    n = c.execute(e.update().where(e.c.id == entry['id'], e.c.dataset_id == self.id).values(
        messages=dumps(new['messages']), history=dumps(hist), provenance=provenance,
        entry_hash=_entry_hash(new), updated_at=now_ms())).rowcount
    if not n: raise NotFoundError(f"entry {entry['id']} was deleted from dataset {self.name!r}")
    return {**entry, 'messages': new['messages'], 'history': hist, 'provenance': provenance}

@patch
def set_output(self: Dataset, entry_id: str, message: str | dict  # the new assistant output
              ) -> dict:
    "Replace an entry's output by hand: the old one goes to `history`, provenance becomes RELABELED_BY_HUMAN."
    message = _output_message(message)
    with self.db.begin() as c:
        self._touch(c)
        return self._replace_output(c, self._get_entry(c, entry_id), message, 'RELABELED_BY_HUMAN', by='human')

@patch
def set_metadata(self: Dataset, entry_id: str, **labels: str | None) -> dict:
    "Set metadata labels of an entry (a value of `None` removes the label); returns the new metadata."
    bad = {k: v for k, v in labels.items() if v is not None and not isinstance(v, str)}
    if bad: raise ConfigError(f"metadata values must be strings (or None to remove), got {bad!r}")
    e = tables.dataset_entries
    with self.db.begin() as c:
        self._touch(c)
        entry = self._get_entry(c, entry_id)
        meta = {**(entry['metadata'] or {}), **labels}
        meta = {k: v for k, v in meta.items() if v is not None} or None
        new = {**{k: entry[k] for k in ROW_FIELDS}, 'metadata': meta}
        c.execute(e.update().where(e.c.id == entry_id).values(metadata=dumps(meta), entry_hash=_entry_hash(new), updated_at=now_ms()))
    return meta or {}

@patch
def delete_entries(self: Dataset, entry_ids: list | str) -> int:
    "Delete entries by id; returns how many were deleted."
    ids = [entry_ids] if isinstance(entry_ids, str) else list(entry_ids)
    e, n = tables.dataset_entries, 0
    with self.db.begin() as c:
        self._touch(c)
        for i in range(0, len(ids), 500):
            n += c.execute(e.delete().where(e.c.dataset_id == self.id, e.c.id.in_(ids[i:i + 500]))).rowcount
    return n


# %%
first = ds.df.id[0]
ds.set_output(first, 'Hobart, Tasmania')
e = ds.entry(first)
e['messages'][-1], e['provenance'], [(h['output']['content'], h['provenance']) for h in e['history']]

# %%
test_eq(e['messages'][-1], {'role': 'assistant', 'content': 'Hobart, Tasmania'})
test_eq(e['provenance'], 'RELABELED_BY_HUMAN')
broken = {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'x', 'type': 'function', 'function': {'name': 'f', 'arguments': '{oops'}}]}
test_fail(lambda: ds.set_output(first, broken), contains='messages[2].tool_calls[0].function.arguments: not valid JSON')
test_eq(ds.entry(first)['messages'][-1]['content'], 'Hobart, Tasmania')   # unchanged after the refused edit
test_eq(ds.set_metadata(first, reviewed='yes', prompt_id=None), {'reviewed': 'yes'})
test_fail(lambda: ds.set_metadata(first, score=3), contains='must be strings')
test_eq(ds.delete_entries([ds.df.id[2], 'dse_not_there']), 1)
test_eq(len(ds), 2)

# %% [md]
# ## Pruning rules
#
# Prompts often carry long static text (a system prompt that never changes). A *pruning rule* is such a text:
# training rows have it removed from their input messages (system, developer and user contents; the output is
# never touched), so the fine-tuned model learns to answer without it and requests to it can be shorter. Rules
# belong to the dataset, are applied in the order they were added, and are part of its snapshot. A fine-tuned model
# records the rules of its dataset when it is created, and requests sent to it are pruned with the same rules
# (`formats.apply_pruning_rules`, applied by the client for `openpipe:<slug>` models), so training and serving see
# the same inputs. New rules added afterwards don't change models already trained.
#
# Rules affect quality on small datasets (the spec recommends them from ~10k training examples).

# %%
#| export
@patch
def add_pruning_rule(self: Dataset, text: str  # exact text to remove from input messages
                    ) -> Dataset:
    "Add a pruning rule (text removed from training inputs, and from requests to models trained on this dataset)."
    if not isinstance(text, str) or not text.strip(): raise ConfigError("a pruning rule must be a non-empty string")
    r = tables.pruning_rules
    with self.db.begin() as c:
        self._touch(c)
        if text in [t for _, t in self._rule_rows(c)]: return self
        pos = (c.execute(sa.select(sa.func.max(r.c.position)).where(r.c.dataset_id == self.id)).scalar() or 0) + 1
        c.execute(r.insert().values(id=new_id('pr'), dataset_id=self.id, text=text, position=pos, created_at=now_ms()))
    return self

@patch
def remove_pruning_rule(self: Dataset, rule: str | int  # the rule's text, or its index in `pruning_rules`
                       ) -> Dataset:
    "Remove a pruning rule by text or index."
    rows = self._rule_rows()
    if isinstance(rule, int) and not isinstance(rule, bool):
        if not -len(rows) <= rule < len(rows): raise NotFoundError(f"dataset {self.name!r} has {len(rows)} pruning rules; no index {rule}")
        rid = rows[rule][0]
    else:
        ids = [i for i, t in rows if t == rule]
        if not ids: raise NotFoundError(f"dataset {self.name!r} has no pruning rule {str(rule)[:60]!r}; see ds.pruning_rules")
        rid = ids[0]
    with self.db.begin() as c:
        self._touch(c)
        c.execute(tables.pruning_rules.delete().where(tables.pruning_rules.c.id == rid))
    return self

# %%
ds.add_pruning_rule('You are a helpful assistant. ').add_pruning_rule('Answer with the city only.')
ds.pruning_rules

# %%
test_eq(ds.pruning_rules, ['You are a helpful assistant. ', 'Answer with the city only.'])
test_eq(len(ds.add_pruning_rule('Answer with the city only.').pruning_rules), 2)  # adding twice is a no-op
test_fail(lambda: ds.remove_pruning_rule('nope'), contains='has no pruning rule')
test_eq(ds.add_pruning_rule('temporary').remove_pruning_rule(-1).pruning_rules[-1], 'Answer with the city only.')
test_eq(ds.add_pruning_rule('temporary').remove_pruning_rule('temporary').pruning_rules, ['You are a helpful assistant. ', 'Answer with the city only.'])
test_fail(lambda: ds.add_pruning_rule(''), contains='non-empty string')

# %% [md]
# ## Training rows
#
# `ds.rows(split="TRAIN", apply_pruning=True)` is what a trainer consumes. It streams the entries (bounded memory)
# and yields one dict per entry with exactly these keys:
#
# | key | value |
# |---|---|
# | `messages` | the conversation; the last message is the assistant output. With `apply_pruning=True` the dataset's pruning rules are applied to every *input* message (never to the output) |
# | `tools`, `tool_choice`, `response_format` | as stored, `None` when absent |
# | `rejected_message` | the rejected assistant output for preference training, or `None` |
# | `metadata` | string → string dict (`{}` when there is none) |
# | `split` | `TRAIN` or `TEST` |
#
# `split=None` yields every entry. `pruning_rules=[...]` applies other rules than the dataset's (a fine-tune that
# disabled some of its inherited rules passes the ones it kept, and records the same list for serving). The
# fine-tune builds SFT examples from `messages` (+ `tools`) and, for DPO, uses `messages[:-1]` as prompt,
# `messages[-1]` as chosen and `rejected_message` as rejected.

# %%
#| export
def _row_of(entry: dict, rules: list | None) -> dict:
    msgs = entry['messages']
    if rules: msgs = apply_pruning_rules(msgs[:-1], rules) + msgs[-1:]
    row = {k: entry[k] for k in ROW_FIELDS}
    row['messages'], row['metadata'] = msgs, entry['metadata'] or {}
    return row

@patch
def rows(self: Dataset, split: str | None = 'TRAIN',  # 'TRAIN', 'TEST', or None for all entries
         apply_pruning: bool = True,  # remove the pruning rules from the input messages
         pruning_rules: list[str] | None = None  # rules to apply instead of the dataset's (e.g. a fine-tune that disabled some)
        ):
    "Stream training rows: dicts with messages, tools, tool_choice, response_format, rejected_message, metadata, split."
    rules = (self.pruning_rules if pruning_rules is None else list(pruning_rules)) if apply_pruning else None
    for entry in self._iter_entries(split=split): yield _row_of(entry, rules)


# %%
r = next(ds.rows(split=None))
r

# %%
test_eq(list(r), ['messages', 'tools', 'tool_choice', 'response_format', 'rejected_message', 'metadata', 'split'])
test_eq(r['messages'][0]['content'], '')
test_eq(next(ds.rows(split=None, apply_pruning=False))['messages'][0], sys_msg)
test_eq(sum(1 for _ in ds.rows()) + sum(1 for _ in ds.rows('TEST')), len(ds))
test_eq(next(ds.rows(split=None, pruning_rules=['Answer with the city only.']))['messages'][0]['content'], 'You are a helpful assistant. ')
test_eq({r['split'] for r in big.test}, {'TEST'})  # a split view iterates its rows (without pruning)

# %% [md]
# ## Export
#
# `to_jsonl(path)` writes the hosted "Exporting Data" format: one line per entry with `messages`, `tools`,
# `tool_choice`, `response_format` (when present), `split`, `rejected_message` and `metadata` (when present). It is
# also the upload format, so exporting and re-importing gives an equal dataset: the same entries in the same
# order with the same splits (checked below with snapshots). By default the export holds the data as stored;
# `apply_pruning=True` writes what the trainer sees. `split=` exports one split.

# %%
#| export
@patch
def to_jsonl(self: Dataset, path: str | Path,  # file to write (overwritten)
             split: str | None = None,  # only this split
             apply_pruning: bool = False  # write inputs with the pruning rules applied
            ) -> Path:
    "Write the entries in the OpenAI fine-tuning JSONL format plus split, rejected_message and metadata; returns the path."
    path = Path(path).expanduser()
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        for row in self.rows(split=split, apply_pruning=apply_pruning):
            f.write(json.dumps({k: v for k, v in row.items() if v is not None and not (k == 'metadata' and not v)},
                               ensure_ascii=False) + '\n')
    tmp.replace(path)
    return path


# %%
out = ds.to_jsonl(Path(lab) / 'capitals.jsonl')
print(out.read_text())

# %% [md]
# ## Snapshots
#
# A fine-tune or an eval must say exactly which data it saw. `ds.snapshot()` is a content hash
# (`formats.content_hash`) of the entries, in order, each with its split, plus the pruning rules: two datasets with
# the same snapshot train identically, and any change (an edited output, a moved entry, a new rule) changes it.
# Ids, timestamps, provenance and history don't enter it, so a re-imported export has the same snapshot as its
# source. `ds.train.snapshot()` covers one split.

# %%
#| export
@patch
def snapshot(self: Dataset, split: str | None = None  # only this split
            ) -> str:
    "Content hash (sha256 hex) of the entries in order (content + split) and the pruning rules."
    e, hashes, last = tables.dataset_entries, [], None
    while True:
        stmt = self._filter(sa.select(e.c.position, e.c.entry_hash, e.c.split), split)
        if last is not None: stmt = stmt.where(e.c.position > last)
        with self.db.connect() as c: page = c.execute(stmt.order_by(e.c.position).limit(10 * _BATCH)).all()
        if not page: break
        hashes.extend(f"{h}:{s}" for _, h, s in page)
        last = page[-1][0]
    return content_hash({'entries': hashes, 'pruning_rules': self.pruning_rules})


# %%
copy = Dataset.from_jsonl(out, 'capitals-copy', store=logs)
test_ne(copy.snapshot(), ds.snapshot())            # the copy has no pruning rules yet...
for rule in ds.pruning_rules: copy.add_pruning_rule(rule)
test_eq(copy.snapshot(), ds.snapshot())            # ...now it is the same data
test_eq(copy.df.split.tolist(), ds.df.split.tolist())
before = copy.snapshot()
copy.set_split(copy.df.id[0], 'TEST')
test_ne(copy.snapshot(), before)
test_eq(len(ds.snapshot()), 64)
copy.delete()
test_eq(Dataset.list(store=logs).name.tolist(), ['capitals', 'many', 'many-again', 'nasty'])

# %% [md]
# ## Hugging Face datasets
#
# `to_hf()` gives a `datasets.DatasetDict` with `train` and `test` (or, with `split=`, one `datasets.Dataset`),
# ready for TRL: `messages` is a native list of `{role, content, ...}` records (TRL's conversational format).
# `tools`, `tool_choice`, `response_format`, `rejected_message` and `metadata` are JSON text columns, because
# their shapes vary from row to row (every tool has its own parameter schema) while an Arrow column needs one
# schema; `json.loads` them when needed. `Dataset.from_hf(hf, name)` reads that layout back (and also accepts
# those columns as native values), taking splits from a `DatasetDict`'s `train`/`test` keys when rows have none.

# %%
#| export
_HF_JSON = ('tools', 'tool_choice', 'response_format', 'rejected_message', 'metadata')

@patch
def to_hf(self: Dataset, split: str | None = None,  # one split as a `datasets.Dataset`; None: a DatasetDict of both
          apply_pruning: bool = False) -> 'datasets.Dataset | datasets.DatasetDict':
    "The dataset as HF `datasets` (messages native, the variable-shape fields as JSON text)."
    hf = require('datasets')
    def one(s):
        def gen():
            for row in self.rows(split=s, apply_pruning=apply_pruning):
                yield {'messages': row['messages'], **{k: dumps(row[k] or None) for k in _HF_JSON}, 'split': row['split']}
        rows = list(gen())
        if not rows: return hf.Dataset.from_dict({k: [] for k in ('messages',) + _HF_JSON + ('split',)})
        try: return hf.Dataset.from_list(rows)
        except Exception as err:  # messages whose shapes Arrow cannot unify (e.g. string and list contents)
            warnings.warn(f"{self.name}: messages stored as JSON text in the HF dataset ({err})")
            return hf.Dataset.from_list([{**r, 'messages': dumps(r['messages'])} for r in rows])
    if split is not None: return one(_check_split(split))
    return hf.DatasetDict({'train': one('TRAIN'), 'test': one('TEST')})

def _from_hf_value(v):
    return loads(v) if isinstance(v, str) else v

def _strip_nones(m):
    "Undo Arrow's struct unification: drop keys that are None except an assistant's `content`."
    if isinstance(m, dict):
        return {k: _strip_nones(v) for k, v in m.items() if v is not None or (k == 'content' and m.get('role') == 'assistant')}
    if isinstance(m, list): return [_strip_nones(x) for x in m]
    return m

def _hf_entry(row: dict, default_split=None) -> dict:
    msgs = _from_hf_value(row.get('messages'))
    out = {'messages': _strip_nones(msgs) if isinstance(msgs, list) else msgs}
    for k in _HF_JSON:
        if row.get(k) is not None:
            v = _from_hf_value(row[k])
            out[k] = _strip_nones(v) if k == 'rejected_message' else v
    split = row.get('split') or default_split
    if split: out['split'] = split.upper() if isinstance(split, str) and split.upper() in SPLITS else split
    return out

@patch(cls_method=True)
def from_hf(cls: Dataset, hf_dataset,  # a `datasets.Dataset`, a `DatasetDict` (train/test keys) or a list of row dicts
            name: str, store: LogStore | None = None) -> Dataset:
    "A new dataset from HF `datasets` rows; invalid rows are reported in `.errors` by row index."
    parts = [(k, v) for k, v in hf_dataset.items()] if hasattr(hf_dataset, 'items') else [(None, hf_dataset)]
    ds = cls.create(name, store)
    try:
        w, problems = _Writer(ds, 'UPLOAD'), []
        for key, part in parts:
            default = {'train': 'TRAIN', 'test': 'TEST'}.get(key) if key else None
            for i, row in enumerate(part):
                where = f"{key}[{i}]" if key else f"[{i}]"
                w.problems += [Problem(where + (f".{p.path}" if p.path else ''), p.message) for p in w.add(_hf_entry(row, default))]
        w.flush()
    except BaseException:
        ds.delete(); raise
    ds.errors = w.problems
    return ds


# %%
os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
hf = big.to_hf()
hf

# %%
test_eq(hf['train'][0]['messages'][-1], {'role': 'assistant', 'content': 'city #0'})
back = Dataset.from_hf(hf, 'many-from-hf', store=logs)
test_eq(sorted(r['messages'][-1]['content'] for r in back.rows(None)), sorted(r['messages'][-1]['content'] for r in big.rows(None)))
test_eq(back.train.snapshot(), big.train.snapshot())
test_eq(len(back.test), 200)
back.delete();

# %% [md]
# ## Importing request logs
#
# `LogStore.filter(...).to_dataset(name)` (and `Dataset.from_logs(query, name)`, which it calls) turns logged calls
# into a new dataset, and `ds.add_logs(query)` adds them to an existing one, as the hosted "Importing Request Logs"
# page does: for each *successful* call (status 200 with a
# response message), the request's messages plus the response message become the entry's messages, the request's
# `tools` / `tool_choice` / `response_format` are kept (deprecated `functions` converted), the log's metadata tags
# become the entry's `metadata` (except the client's own `$sdk...` tags), and the entry links back to its log (`log_id`) with provenance `REQUEST_LOG`.
# Failed calls are skipped (counted in `.skipped_`); calls whose payloads do not validate are reported in `.errors`
# with the log id as the path.

# %%
#| export
_OUTPUT_KEYS = ('role', 'content', 'tool_calls', 'function_call', 'refusal')

def _log_entry(log: dict) -> dict | None:
    "The dataset entry for one logged call, or None when the call did not succeed with a response message."
    req, resp = log.get('req_payload'), log.get('resp_payload')
    if log.get('status_code') != 200 or not isinstance(req, dict) or not isinstance(resp, dict): return None
    choices = resp.get('choices')
    msg = choices[0].get('message') if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if not isinstance(msg, dict): return None
    out = {k: msg[k] for k in _OUTPUT_KEYS if msg.get(k) not in (None, [])}  # drop the response-only nulls
    out.setdefault('content', None)
    msgs = req.get('messages')
    entry = {'messages': msgs + [out] if isinstance(msgs, list) else msgs}
    entry.update({k: req[k] for k in ('tools', 'tool_choice', 'response_format', 'functions', 'function_call') if req.get(k) is not None})
    tags = {k: v for k, v in (log.get('tags') or {}).items() if not k.startswith('$')}  # `$sdk`...: the client's own
    if tags: entry['metadata'] = tags
    return entry

@patch
def add_logs(self: Dataset, query  # a `LogQuery` (`logs.filter(...)`): iterating it yields log dicts
            ) -> Dataset:
    "Append the successful calls matched by a log query (request messages + response message as the output)."
    w, skipped = _Writer(self, 'REQUEST_LOG'), 0
    for log in query:
        entry = _log_entry(log)
        if entry is None: skipped += 1; continue
        w.problems += [Problem(f"log {log['id']}" + (f": {p.path}" if p.path else ''), p.message)
                       for p in w.add(entry, log_id=log['id'])]
    w.flush()
    self.errors, self.skipped_ = w.problems, skipped
    return self

@patch(cls_method=True)
def from_logs(cls: Dataset, query,  # a `LogQuery` (`logs.filter(...)`); the dataset goes to the query's lab
              name: str) -> Dataset:
    "A new dataset from the successful calls matched by a log query (what `LogQuery.to_dataset(name)` calls)."
    ds = cls.create(name, query.store)
    try: return ds.add_logs(query)
    except BaseException:
        ds.delete(); raise

# %% [md]
# Three calls recorded with `logs.report` (the hosted `/report`: a call made elsewhere, recorded afterwards; the
# client records its own calls the same way): two successful ones tagged `prompt_id=capitals`, one that failed.

# %%
def report(question, answer, status=200):
    req = {'model': 'gpt-4o-mini', 'messages': [sys_msg, {'role': 'user', 'content': question}], 'metadata': {'prompt_id': 'capitals'}}
    resp = {'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 0, 'model': 'gpt-4o-mini',
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': answer, 'refusal': None}}]}
    logs.report(requested_at=1_700_000_000_000, received_at=1_700_000_000_500, req_payload=req,
                resp_payload=resp if status == 200 else None, status_code=status,
                error_message=None if status == 200 else 'rate limited')
report('Capital of Italy?', 'Rome')
report('Capital of Spain?', 'Madrid')
report('Capital of Chad?', None, status=429)
logs.flush()
logged = logs.filter(prompt_id='capitals').to_dataset('capitals-from-logs')
logged, logged.skipped_

# %%
e = logged.entries()[0]
test_eq(e['messages'][-1], {'role': 'assistant', 'content': 'Rome'})
test_eq((e['provenance'], e['metadata']), ('REQUEST_LOG', {'prompt_id': 'capitals'}))
test_eq(logged.skipped_, 1)
assert e['log_id'].startswith('log_')
n = len(ds)
test_eq(len(ds.add_logs(logs.filter(prompt_id='capitals'))), n + 2)   # into an existing dataset
test_eq(ds.entries(offset=n, limit=1)[0]['provenance'], 'REQUEST_LOG')

# %% [md]
# ## Relabeling
#
# `relabel(model)` sends each entry's *input* (messages without the output, plus `tools`, `tool_choice` and
# `response_format`) to another model through the lab's client (`store.openai()`, so any routed model id works:
# `gpt-4o`, `anthropic:claude-...`, `openpipe:my-ft`, and every call is logged), and replaces the output with the
# answer. The old output is kept in the entry's `history` (with the model and the job id) and the provenance
# becomes `RELABELED_BY_MODEL`.
#
# * **Concurrency**: `concurrency` calls run at once in a thread pool; results are written from the calling thread
#   as they arrive, so an interruption loses at most the calls in flight.
# * **Per-row failures** don't abort the job: a call that fails (after the client's own retries), or whose answer
#   is not a valid output, is listed in `relabel_failures_` (entry id, position, error) and the entry keeps its
#   output.
# * **Resume**: the job (id, model, state) is recorded on the dataset. If a job for the same model did not finish
#   (interrupted, killed, or with failures), `relabel(model)` resumes it: entries it already relabeled are skipped
#   and only the rest (including failed ones) are sent. Once a job has finished cleanly, calling `relabel` again
#   starts a new job that relabels everything again. `resume=False` forces a new job.
# * `split=` relabels one split only; `client=` passes another OpenAI-compatible client (default `store.openai()`);
#   `progress=False` hides the progress bar. Through the lab's client, every relabel call is logged with the tags
#   `relabel.dataset` and `relabel.job`, so `logs.filter(**{"relabel.job": ds.relabel_job_["id"]})` finds them.

# %%
#| export
def _relabel_call(client, model: str, entry: dict, kwargs: dict) -> dict:
    "Ask `model` for a new output for `entry`; returns the assistant message (role, content, tool_calls)."
    req = dict(model=model, messages=entry['messages'][:-1], **kwargs)
    for k in ('tools', 'tool_choice', 'response_format'):
        if entry[k] is not None: req[k] = entry[k]
    resp = client.chat.completions.create(**req)
    msg = resp.choices[0].message
    msg = msg.model_dump(exclude_none=True) if hasattr(msg, 'model_dump') else dict(msg)
    out = {k: msg[k] for k in ('role', 'content', 'tool_calls') if msg.get(k) is not None}
    if out.get('tool_calls'):
        out['tool_calls'] = [{'id': tc.get('id') or f'call_{i}', 'type': 'function',
                              'function': {'name': tc['function']['name'], 'arguments': tc['function'].get('arguments') or '{}'}}
                             for i, tc in enumerate(out['tool_calls'])]
        out.setdefault('content', None)
    else: out.pop('tool_calls', None)
    out['role'] = 'assistant'
    if out.get('content') is None and not out.get('tool_calls'):
        raise ProviderError(f"{model} returned no content and no tool calls (finish_reason={resp.choices[0].finish_reason!r})")
    return out

@patch
def relabel(self: Dataset, model: str,  # any model id the client routes: 'gpt-4o', 'anthropic:claude-...', 'openpipe:ft'
            concurrency: int = 8,  # calls in flight at once
            split: str | None = None,  # only entries of this split
            resume: bool = True,  # continue an unfinished job for the same model
            client=None,  # an OpenAI-compatible client; default `self.store.openai()`
            progress: bool = True,  # show a tqdm progress bar
            **kwargs  # extra `chat.completions.create` arguments (temperature, max_tokens, ...)
           ) -> Dataset:
    "Replace each entry's output with `model`'s answer to its input; resumable, with per-row failures collected."
    if not isinstance(concurrency, int) or concurrency < 1: raise ConfigError(f"concurrency must be a positive integer, got {concurrency!r}")
    if split is not None: _check_split(split)
    client = client if client is not None else self.store.openai()
    job = self._config().get('relabel')
    if not (resume and job and job.get('model') == model and job.get('split') == split and job.get('status') != 'done'):
        job = {'id': new_id('rlb'), 'model': model, 'split': split}
    if hasattr(client, 'openpipe_options'):  # our client: tag the logged calls with the dataset and the job
        kwargs.setdefault('openpipe', {'tags': {'relabel.dataset': self.name, 'relabel.job': job['id']}})
    job['status'] = 'running'
    with self.db.begin() as c: self._set_config(c, relabel=job)
    todo = self.count(split=split)
    from tqdm.auto import tqdm
    bar = tqdm(total=todo, desc=f"relabel {self.name} with {model}", disable=not progress, unit='entry')
    failures, done, in_flight = [], 0, {}
    def finish(fut):
        nonlocal done
        entry = in_flight.pop(fut)
        try:
            out = fut.result()
            with self.db.begin() as c:
                self._touch(c)
                self._replace_output(c, entry, out, 'RELABELED_BY_MODEL', by=model, job=job['id'])
            done += 1
        except NotFoundError: pass  # deleted while we were relabeling it
        except Exception as err:
            failures.append({'entry_id': entry['id'], 'position': entry['position'], 'error': f"{type(err).__name__}: {err}"})
        bar.update(1)
    def drain(futures):
        "Write finished calls in entry order; an interrupt raised by one is re-raised after the others are written."
        stop = None
        for fut in sorted(futures, key=lambda f: in_flight[f]['position']):
            try: finish(fut)
            except BaseException as e: stop = stop or e  # KeyboardInterrupt/SystemExit from a worker
        if stop is not None: raise stop
    status = 'interrupted'
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix='relabel')
    try:
        for entry in self._iter_entries(split=split, page=max(100, 4 * concurrency)):
            hist = entry['history'] or []
            if hist and hist[-1].get('job') == job['id']: bar.update(1); continue  # done in an earlier run of this job
            while len(in_flight) >= 2 * concurrency: drain(wait(list(in_flight), return_when=FIRST_COMPLETED).done)
            in_flight[pool.submit(_relabel_call, client, model, entry, kwargs)] = entry
        while in_flight: drain(wait(list(in_flight), return_when=FIRST_COMPLETED).done)
        status = 'incomplete' if failures else 'done'
    finally:
        if status == 'interrupted':  # keep the answers that already arrived; the rest is cancelled
            drain([f for f in in_flight if f.done() and not f.cancelled() and f.exception() is None])
        pool.shutdown(wait=status != 'interrupted', cancel_futures=True)
        bar.close()
        job.update(status=status, failed=len(failures))
        with self.db.begin() as c: self._set_config(c, relabel=job)
        self.relabel_failures_ = failures
        if status == 'interrupted':
            print(f"relabel interrupted: run ds.relabel({model!r}) again to resume job {job['id']}", file=sys.stderr)
    self.relabel_job_ = job
    return self


# %% [md]
# The real client needs a model server; this notebook runs offline, so the demo passes a stand-in `client=` that
# answers like an OpenAI SDK client (the pytest suite relabels through `store.openai()` against a fake upstream
# server). Our stand-in shouts the question back, and fails once on the Chile question:

# %%
from types import SimpleNamespace as NS

# %%
class Shouter:
    "Answers like `openai.OpenAI().chat.completions.create`: the last user message in capitals."
    def __init__(self, fail_on=None): self.fail_on, self.calls = fail_on, 0; self.chat = NS(completions=self)
    def create(self, model, messages, **kw):
        self.calls += 1
        text = messages[-1]['content']
        if self.fail_on and self.fail_on in text: raise ProviderError(f"upstream 500 for {text!r}")
        return NS(choices=[NS(finish_reason='stop', message=NS(model_dump=lambda **_: {'role': 'assistant', 'content': text.upper()}))])

rl = Dataset.create('relabel-demo', store=logs)
rl.add_entries([qa(c, '?') for c in ['Chile', 'Peru', 'Fiji', 'Laos']])
rl.relabel('shouty-1', client=Shouter(fail_on='Chile'), concurrency=2, progress=False)
[(f['position'], f['error']) for f in rl.relabel_failures_]

# %%
test_eq([r['messages'][-1]['content'] for r in rl.rows(None)][1:], ['WHAT IS THE CAPITAL OF PERU?', 'WHAT IS THE CAPITAL OF FIJI?', 'WHAT IS THE CAPITAL OF LAOS?'])
test_eq(len(rl.relabel_failures_), 1)
test_eq(rl.relabel_job_['status'], 'incomplete')
e = rl.entries(offset=1, limit=1)[0]
test_eq((e['provenance'], e['history'][-1]['output']['content'], e['history'][-1]['by']), ('RELABELED_BY_MODEL', '?', 'shouty-1'))

# %% [md]
# The job did not finish (one failure), so running it again resumes it: only the failed entry is sent.

# %%
again_client = Shouter()
rl.relabel('shouty-1', client=again_client, progress=False)
test_eq(again_client.calls, 1)
test_eq((rl.relabel_job_['status'], rl.relabel_failures_), ('done', []))
test_eq(rl.entries(limit=1)[0]['messages'][-1]['content'], 'WHAT IS THE CAPITAL OF CHILE?')
rl.relabel('shouty-1', client=again_client, progress=False)    # a finished job: a new job relabels everything
test_eq(again_client.calls, 5)
test_eq(len(rl.entries(limit=1)[0]['history']), 2)

# %% [md]
# ## Reviewing in a widget
#
# `ds.review()` opens an ipywidgets UI to page through entries rendered as a chat, filter them, edit outputs, move
# entries between splits and delete them; it is built in `06a_review` on the methods above.

# %%
#| export
@patch
def review(self: Dataset, **kwargs):
    "An ipywidgets UI to read, filter, edit (RELABELED_BY_HUMAN), re-split and delete entries (see `06a_review`)."
    from openpipe_lab.review import DatasetReview
    return DatasetReview(self, **kwargs)


# %% [md]
# ## Closing note: import speed and memory
#
# `bench/dataset_import.py` generates chat JSONL files (a system prompt, ~60 words of user text, a text or
# tool-call output, tools on a third of the rows, metadata on half; ~0.95 KB a line) and imports each in a fresh
# process, next to two baselines in the same run: parsing only (`read_jsonl`) and parsing + validation. Measured on
# the 2-core development machine, shared with other jobs (load average ~5 during the run, so the baselines swing
# too; an earlier run gave 10,229 rows/s and the same 113 MB for 100k rows):
#
# | rows | file | import | rows/s | vs parse-only | vs validate-only | peak RSS | database |
# |---:|---:|---:|---:|---:|---:|---:|---:|
# | 10,000 | 9 MB | 1.3 s | 7,920 | 0.07 | 0.15 | 59 MB | 15 MB |
# | **100,000** | **92 MB** | **10.9 s** | **9,167** | 0.08 | 0.17 | **113 MB** | 144 MB |
# | 200,000 | 185 MB | 23.4 s | 8,552 | 0.04 | 0.11 | 113 MB | 287 MB |
#
# Memory is bounded: the peak is the same for 100k and 200k rows. The process holds ~43 MB before the import
# starts; the file is streamed and entries go to the database 1,000 at a time, so the only thing that grows is
# SQLite's page cache, which the store caps at 64 MiB per connection. The pytest
# `tests/test_dataset_import_100k.py` checks this bound on every run (and that all 100k rows arrive and the bad
# lines appended to the file are reported by line). Time goes, in order, to the content hash of each entry
# (canonical JSON + SHA-256, ~30%), validation (~20%), encoding the JSON columns (~15%) and the inserts (~15%).
# Reproduce with `python bench/dataset_import.py` (results in `bench/results/dataset_import.json`).

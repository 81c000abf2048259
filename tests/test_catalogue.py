"""The bad-input catalogue (issue 13): every public entry point x the bad inputs tried -> our error type and the first
line of its message. Each case must raise the expected subclass of OpenPipeLabError (never a dependency's exception);
the table in CONTRIBUTING.md is generated from these cases and checked here, so it cannot go stale.

Regenerate after changing a message:  OPENPIPE_LAB_WRITE_CATALOGUE=1 .venv/bin/python -m pytest tests/test_catalogue.py
"""
import json, os, re
from pathlib import Path
import pytest
from openpipe_lab.core import *

DOC = Path(__file__).resolve().parents[1] / 'CONTRIBUTING.md'
START, END = '<!-- bad-input-catalogue:start -->', '<!-- bad-input-catalogue:end -->'
ROW = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}

def cases(lab, tmp):
    "(entry point, bad input, expected error type, callable) for every case."
    from openpipe_lab import LogStore, Dataset, FineTune, Deployment, Eval
    from openpipe_lab.formats import read_jsonl
    from openpipe_lab.core import lazy_attr
    (tmp / 'garbage.db').write_bytes(b'not a database\n' * 100)
    (tmp / 'bad.jsonl').write_text('not json\n{"messages": []}\n')
    (tmp / 'not-an-adapter').mkdir()
    (tmp / 'file').write_text('x')
    (tmp / 'adapter').mkdir()
    (tmp / 'adapter' / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA', 'r': 8, 'base_model_name_or_path': str(tmp)}))
    ds = Dataset.create('cat-ds', store=lab)
    ds.add_entries([ROW])
    Dataset.create('taken', store=lab)
    client = lab.openai(max_retries=0)
    msgs = ROW['messages'][:1]
    yield from [
        ('LogStore(url)', 'a path under a regular file', LabDirError, lambda: LogStore(str(tmp / 'file' / 'lab.db'))),
        ('LogStore(url)', 'a file that is not a database', StoreError, lambda: LogStore(str(tmp / 'garbage.db'))),
        ('LogStore(url)', 'an unknown database driver', StoreError, lambda: LogStore('nosuchdb://host/db')),
        ('LogStore.report', 'req_payload that is not JSON', ValidationError, lambda: lab.report(req_payload='{not json')),
        ('LogStore.report', 'status_code as a string', ValidationError, lambda: lab.report(req_payload={'model': 'm'}, status_code='200')),
        ('LogStore.report', 'a metadata value that is a list', ValidationError, lambda: lab.report(req_payload={'model': 'm'}, metadata={'k': [1]})),
        ('LogStore.report', 'requested_at as text', ValidationError, lambda: lab.report(req_payload={'model': 'm'}, requested_at='yesterday')),
        ('LogStore.dataset', 'an unknown name', NotFoundError, lambda: lab.dataset('no-such-dataset')),
        ('LogStore.add_provider', 'a name with spaces', ConfigError, lambda: lab.add_provider('My Provider', base_url='http://x', api_key_env='K')),
        ('openai().chat.completions.create', 'an unknown provider prefix', ProviderError,
         lambda: client.chat.completions.create(model='nosuch:model', messages=msgs)),
        ('openai().chat.completions.create', 'openpipe:<slug> with no deployment', ProviderError,
         lambda: client.chat.completions.create(model='openpipe:not-deployed', messages=msgs)),
        ('openai().chat.completions.create', 'an OpenAI model without OPENAI_API_KEY', MissingAPIKeyError,
         lambda: client.chat.completions.create(model='gpt-4o-mini', messages=msgs)),
        ('openai().chat.completions.create', "openpipe={'fallback': 'gpt-4o'} (not a dict)", ConfigError,
         lambda: client.chat.completions.create(model='gpt-4o-mini', messages=msgs, openpipe={'fallback': 'gpt-4o'})),
        ('Dataset.create', 'a name with spaces', ConfigError, lambda: Dataset.create('My Data', store=lab)),
        ('Dataset.create', 'a name already taken', AlreadyExistsError, lambda: Dataset.create('taken', store=lab)),
        ('Dataset.open', 'an unknown name', NotFoundError, lambda: Dataset.open('no-such-dataset', store=lab)),
        ('Dataset.from_jsonl', 'a missing file', ConfigError, lambda: Dataset.from_jsonl(tmp / 'missing.jsonl', 'x', store=lab)),
        ('Dataset.from_jsonl', 'a directory', ConfigError, lambda: Dataset.from_jsonl(tmp, 'x', store=lab)),
        ('Dataset.from_jsonl', 'a file with no valid line', ValidationError, lambda: Dataset.from_jsonl(tmp / 'bad.jsonl', 'x', store=lab)),
        ('Dataset.add_entries', 'an empty list', ConfigError, lambda: ds.add_entries([])),
        ('Dataset.add_entries', '101 entries (above the API limit)', ConfigError, lambda: ds.add_entries([ROW] * 101)),
        ('Dataset.split', 'test_fraction=2', ConfigError, lambda: ds.split(test_fraction=2)),
        ('Dataset.set_split', "split 'VALID'", ConfigError, lambda: ds.set_split([], 'VALID')),
        ('FineTune', 'a slug with spaces', ConfigError, lambda: FineTune([ROW], 'HuggingFaceTB/SmolLM2-135M-Instruct', 'My Model', store=lab)),
        ('FineTune', 'lora_rank=0', ConfigError, lambda: FineTune([ROW], 'HuggingFaceTB/SmolLM2-135M-Instruct', 'ok-slug', lora_rank=0, store=lab)),
        ('FineTune', 'num_machines=2 without main_process_ip', ConfigError, lambda: FineTune([ROW], 'HuggingFaceTB/SmolLM2-135M-Instruct', 'ok-slug', num_machines=2, store=lab)),
        ('FineTune', 'a base model folder that does not exist', ConfigError, lambda: FineTune([ROW], str(tmp / 'no-model'), 'ok-slug', store=lab)),
        ('FineTune.get', 'an unknown slug', NotFoundError, lambda: FineTune.get('no-such-model', store=lab)),
        ('Deployment', 'no models and no base_model', ConfigError, lambda: Deployment([], store=lab)),
        ('Deployment', "speculative='medusa'", ConfigError, lambda: Deployment('x', speculative='medusa', store=lab)),
        ('Deployment', 'tensor_parallel_size=0', ConfigError, lambda: Deployment('x', tensor_parallel_size=0, store=lab)),
        ('Deployment', 'merged=True with two models', ConfigError, lambda: Deployment(['a', 'b'], merged=True, store=lab)),
        ('Deployment.start', 'an unknown slug', NotFoundError, lambda: Deployment('no-such-model', store=lab).start()),
        ('Deployment.start', 'a folder that is not a LoRA adapter', DeploymentError, lambda: Deployment(tmp / 'not-an-adapter', store=lab).start()),
        ('Deployment.start', 'python= an interpreter that does not exist', ConfigError,
         lambda: Deployment(tmp / 'adapter', python='/no/such/python', store=lab).start()),
        ('Deployment.logs', 'before start()', DeploymentError, lambda: Deployment('x', store=lab).logs()),
        ('Eval.run', 'data that is a number', ConfigError, lambda: Eval(42, models=['gpt-4o-mini'], store=lab).code('exact_match').run()),
        ('Eval', 'a model that is a number', ConfigError, lambda: Eval([ROW], models=[1], store=lab)),
        ('Eval.code', 'an unknown grader template', ConfigError, lambda: Eval([ROW], models=['gpt-4o-mini'], store=lab).code('no-such-grader')),
        ('Eval.run', 'no graders', ConfigError, lambda: Eval([ROW], models=['gpt-4o-mini'], store=lab).run()),
        ('Eval.get', 'an unknown name', NotFoundError, lambda: Eval.get('no-such-eval', store=lab)),
        ('read_jsonl', 'a missing file', ConfigError, lambda: read_jsonl(tmp / 'missing.jsonl')),
        ('check_slug', "'Bad Slug'", ConfigError, lambda: check_slug('Bad Slug')),
        ('require', 'a module that is not installed', MissingDependencyError, lambda: require('no_such_module_xyz')),
        ('from openpipe_lab import X', 'a lazy name whose module is missing', MissingDependencyError,
         lambda: lazy_attr('openpipe_lab', 'Ghost', 'no_such_module')),
    ]
    from openpipe_lab.criterion import Criterion   # wave 2: Criterion
    yield from [
        ('Criterion', 'a name with spaces', ConfigError, lambda: Criterion('No PII', prompt='Fail if PII.', judge_model='gpt-4o-mini', store=lab)),
        ('Criterion.get', 'an unknown name', NotFoundError, lambda: Criterion.get('no-such-criterion', store=lab)),
    ]

def _first_line(err, tmp: Path) -> str:
    "The message's first line; for a message that lists problems below it, with the first problem."
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    first = lines[0] if lines else ''
    if len(lines) > 1 and (first.endswith(':') or getattr(err, 'problems', None)): first += ' ' + lines[1]
    first = first.replace(str(tmp), '<tmp>').replace(str(Path.cwd()), '<cwd>')
    first = re.sub(r'\b(ds|dse|log|ft|dep|ev|crit)_[0-9a-f]{13}_[0-9a-f]{12}\b', r'\1_<id>', first)
    first = re.sub(r'/tmp/pytest-of-[^\s\'")]+', '<tmp>', first)
    return (first[:157] + '...' if len(first) > 160 else first).replace('|', '\\|')

def table(lab, tmp) -> tuple[str, list]:
    rows, wrong = [], []
    for entry, bad, expected, fn in cases(lab, tmp):
        try:
            fn(); got, msg = None, '(no error raised)'
        except Exception as e: got, msg = e, e
        name = type(got).__name__ if got is not None else '—'
        if not isinstance(got, expected): wrong.append(f"{entry} with {bad}: expected {expected.__name__}, got {name}: {str(msg)[:300]}")
        rows.append(f"| `{entry}` | {bad} | `{name}` | {_first_line(msg, tmp)} |")
    head = ['| entry point | bad input | error | first line of the message |', '|---|---|---|---|']
    return '\n'.join(head + rows), wrong

def test_bad_input_catalogue(lab, tmp_path, monkeypatch):
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    monkeypatch.chdir(tmp_path)
    text, wrong = table(lab, tmp_path)
    assert not wrong, 'entry points that did not raise our error:\n' + '\n'.join(wrong)
    n = text.count('\n') - 1
    section = (f"{START}\n_{n} cases, generated by `tests/test_catalogue.py` (which fails when this table is out of date; "
               f"regenerate with `OPENPIPE_LAB_WRITE_CATALOGUE=1 .venv/bin/python -m pytest tests/test_catalogue.py`)._\n\n{text}\n{END}")
    doc = DOC.read_text()
    if os.environ.get('OPENPIPE_LAB_WRITE_CATALOGUE'):
        if START in doc: doc = doc[:doc.index(START)] + section + doc[doc.index(END) + len(END):]
        else: doc = doc.rstrip('\n') + '\n\n## Bad-input catalogue\n\nWhat each public entry point says when given bad input.\n\n' + section + '\n'
        DOC.write_text(doc)
    assert START in doc and END in doc, f"{DOC} has no catalogue section: run with OPENPIPE_LAB_WRITE_CATALOGUE=1"
    current = doc[doc.index(START):doc.index(END) + len(END)]
    assert current == section, "the bad-input catalogue in CONTRIBUTING.md is out of date: rerun with OPENPIPE_LAB_WRITE_CATALOGUE=1"

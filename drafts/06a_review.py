# %%
#| default_exp review

# %% [md]
# # Review
#
# > `ds.review()`: an ipywidgets UI to page through a dataset's entries rendered as chats, filter them, edit the
# > assistant output, move entries between splits and delete them.

# %%
#| export
from __future__ import annotations
import html, json
from openpipe_lab.core import *
from openpipe_lab.formats import Problem
from openpipe_lab.dataset import Dataset, SPLITS, PROVENANCES

# %%
#| hide
from fastcore.test import *
import tempfile
from openpipe_lab.logstore import LogStore

# %% [md]
# The hosted product reviews datasets in its web app; here the same work happens in the notebook. The widget is
# deliberately thin: every action calls one plain `Dataset` method (`entries`, `count`, `set_output`, `set_split`,
# `delete_entries`), which carry the tests and work the same from a script. The widget only keeps *where you
# are* (the filters and the position) and renders.

# %% [md]
# ## Rendering an entry as a chat
#
# Each message is a block with its role; tool calls are shown as `name(arguments)` with the JSON arguments
# pretty-printed, tool results name the call they answer, image parts show their URL. The output (the last
# message) is outlined, and a `rejected_message` is shown under it in red. Everything is HTML-escaped: entries are
# data, never markup.

# %%
#| export
_ROLE_COLOURS = {'system': '#6b7280', 'developer': '#6b7280', 'user': '#2563eb', 'assistant': '#059669', 'tool': '#b45309', 'function': '#b45309'}

def _text(content) -> str:
    "The readable text of a message content (a string, a list of parts, or None)."
    if content is None: return ''
    if isinstance(content, str): return content
    parts = []
    for p in content:
        if not isinstance(p, dict): parts.append(str(p))
        elif p.get('type') == 'text': parts.append(p.get('text', ''))
        elif p.get('type') == 'refusal': parts.append(f"[refusal] {p.get('refusal', '')}")
        elif p.get('type') == 'image_url': parts.append(f"[image: {(p.get('image_url') or {}).get('url', '')[:80]}]")
        elif p.get('type') == 'input_audio': parts.append(f"[audio: {(p.get('input_audio') or {}).get('format', '')}]")
        else: parts.append(json.dumps(p))
    return '\n'.join(parts)

def _pretty_args(arguments) -> str:
    try: return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (TypeError, ValueError): return str(arguments)

def render_message(message: dict, label: str | None = None, style: str = '') -> str:
    "One chat message as an HTML block (escaped), with tool calls shown as `name(pretty JSON arguments)`."
    role = message.get('role', '?')
    head = html.escape(label or role)
    if role == 'tool': head += f" <small>(answers {html.escape(str(message.get('tool_call_id', '')))})</small>"
    if message.get('name'): head += f" <small>{html.escape(str(message['name']))}</small>"
    body = ''
    text = _text(message.get('content'))
    if text: body += f"<div style='white-space:pre-wrap'>{html.escape(text)}</div>"
    for tc in message.get('tool_calls') or []:
        fn = tc.get('function') or {}
        body += (f"<div><code>{html.escape(str(fn.get('name')))}(</code><pre style='margin:0 0 0 1em'>"
                 f"{html.escape(_pretty_args(fn.get('arguments')))}</pre><code>)</code>"
                 f" <small>id {html.escape(str(tc.get('id', '')))}</small></div>")
    if message.get('refusal'): body += f"<div><i>refusal:</i> {html.escape(str(message['refusal']))}</div>"
    colour = _ROLE_COLOURS.get(role, '#111')
    return (f"<div style='margin:4px 0;padding:4px 8px;border-left:4px solid {colour};{style}'>"
            f"<b style='color:{colour}'>{head}</b>{body or '<i>(empty)</i>'}</div>")

def render_entry(entry: dict) -> str:
    "An entry as HTML: a header (split, provenance, metadata, history), the chat, the output outlined, the rejected output."
    meta = ', '.join(f"{html.escape(k)}={html.escape(v)}" for k, v in (entry.get('metadata') or {}).items())
    hist = len(entry.get('history') or [])
    head = (f"<div style='font-size:90%;color:#555'><b>{entry['split']}</b> · {entry['provenance']}"
            + (f" · {meta}" if meta else '') + (f" · {hist} earlier output{'s' * (hist != 1)}" if hist else '')
            + (f" · tools: {', '.join(html.escape(str((t.get('function') or {}).get('name'))) for t in entry['tools'])}" if entry.get('tools') else '')
            + "</div>")
    msgs = entry['messages']
    chat = ''.join(render_message(m) for m in msgs[:-1])
    chat += render_message(msgs[-1], 'assistant · output', 'outline:2px solid #059669')
    if entry.get('rejected_message'):
        chat += render_message(entry['rejected_message'], 'assistant · rejected', 'outline:2px dashed #dc2626')
    return head + chat

# %%
entry = {'split': 'TRAIN', 'provenance': 'UPLOAD', 'metadata': {'prompt_id': 'capitals'}, 'history': None, 'tools': None,
         'messages': [{'role': 'user', 'content': 'Capital of <Tasmania>?'},
                      {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': '{"capital":"Hobart"}'}}]}],
         'rejected_message': {'role': 'assistant', 'content': 'Paris'}}
h = render_entry(entry)
assert 'Capital of &lt;Tasmania&gt;?' in h and '<Tasmania>' not in h
assert 'identify_capital(' in h and '&quot;capital&quot;: &quot;Hobart&quot;' in h
assert 'assistant · rejected' in h and 'prompt_id=capitals' in h

# %% [md]
# ## The widget
#
# `DatasetReview(ds)` (or `ds.review()`) shows one entry at a time:
#
# * **filters**: split, provenance, and metadata as `key=value` pairs separated by commas; the counter shows the
#   position among the entries that match;
# * **navigation**: `◀` / `▶`, and a position box (type a number, press Enter);
# * **edit**: the output's text and, as JSON, its tool calls; **Save** validates the edited output against the
#   whole entry and stores it with provenance `RELABELED_BY_HUMAN` (the old output stays in the entry's history).
#   An invalid edit is refused with the problem shown in the status line, and nothing is stored;
# * **split**: the `TRAIN` / `TEST` toggle moves the entry at once;
# * **delete**: the first click arms the button, the second deletes the entry.
#
# It is keyboard-friendly: every control is reachable with Tab and works with Enter/Space, and the *command*
# box takes one-letter commands followed by Enter — `n` next, `p` previous, `s` save, `t` toggle split, `d`
# delete (twice to confirm), a number to jump to that position — so a reviewer can work through a dataset without
# the mouse. The same actions are methods (`next()`, `prev()`, `go(n)`, `save()`, `set_split(...)`, `delete()`),
# which is how the tests drive it.

# %%
#| export
def _parse_metadata_filter(text: str) -> dict | None:
    "'k=v, k2=v2' -> {'k': 'v', 'k2': 'v2'}; raises ConfigError on a pair without '='."
    out = {}
    for part in (text or '').split(','):
        if not part.strip(): continue
        if '=' not in part: raise ConfigError(f"metadata filter {part.strip()!r}: write key=value (pairs separated by commas)")
        k, v = part.split('=', 1)
        out[k.strip()] = v.strip()
    return out or None

class DatasetReview:
    "An ipywidgets UI over a `Dataset`: read entries as chats, filter, edit outputs, set splits, delete."
    def __init__(self, dataset: Dataset,
                 split: str | None = None,  # start filtered to this split
                 provenance: str | None = None,  # start filtered to this provenance
                 metadata: dict | None = None  # start filtered to entries with these metadata labels
                ):
        widgets = require('ipywidgets')
        self.dataset, self.index, self.entry_ = dataset, 0, None
        W, L = widgets, widgets.Layout
        self.split_filter = W.Dropdown(options=[('all splits', None)] + [(s, s) for s in SPLITS], value=split, description='split', layout=L(width='180px'))
        self.provenance_filter = W.Dropdown(options=[('all provenances', None)] + [(p, p) for p in PROVENANCES], value=provenance,
                                            description='provenance', layout=L(width='300px'))
        self.metadata_filter = W.Text(value=', '.join(f"{k}={v}" for k, v in (metadata or {}).items()), placeholder='key=value, ...',
                                      description='metadata', continuous_update=False, layout=L(width='300px'))
        self.prev_button = W.Button(description='◀', tooltip='previous entry (p)', layout=L(width='40px'))
        self.next_button = W.Button(description='▶', tooltip='next entry (n)', layout=L(width='40px'))
        self.position = W.BoundedIntText(value=1, min=1, max=1, description='', layout=L(width='90px'))
        self.counter = W.HTML()
        self.chat = W.HTML()
        self.output_text = W.Textarea(description='output', placeholder='assistant text', layout=L(width='100%', height='80px'))
        self.tool_calls_text = W.Textarea(description='tool calls', placeholder='JSON list of tool calls (optional)', layout=L(width='100%', height='60px'))
        self.save_button = W.Button(description='Save output', button_style='success', tooltip='store the edited output (s)')
        self.split_toggle = W.ToggleButtons(options=list(SPLITS), tooltips=['move to TRAIN', 'move to TEST'], style={'button_width': '70px'})
        self.delete_button = W.Button(description='Delete', button_style='', tooltip='delete this entry (d, twice)')
        self.command = W.Text(placeholder='n p s t d or a number, then Enter', description='command', continuous_update=False, layout=L(width='320px'))
        self.status = W.HTML()
        self._armed, self._loading = False, False
        for w in (self.split_filter, self.provenance_filter, self.metadata_filter): w.observe(self._on_filter, 'value')
        self.prev_button.on_click(lambda _: self.prev())
        self.next_button.on_click(lambda _: self.next())
        self.position.observe(lambda ch: None if self._loading else self.go(ch['new']), 'value')
        self.save_button.on_click(lambda _: self.save())
        self.split_toggle.observe(lambda ch: None if self._loading else self.set_split(ch['new']), 'value')
        self.delete_button.on_click(lambda _: self.delete())
        self.command.observe(self._on_command, 'value')
        self.widget = W.VBox([
            W.HBox([self.split_filter, self.provenance_filter, self.metadata_filter]),
            W.HBox([self.prev_button, self.position, self.next_button, self.counter]),
            self.chat, self.output_text, self.tool_calls_text,
            W.HBox([self.save_button, self.split_toggle, self.delete_button, self.command]),
            self.status])
        self.refresh()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def filters(self) -> dict:
        "The active filters, as keyword arguments of `Dataset.entries` / `Dataset.count`."
        return dict(split=self.split_filter.value, provenance=self.provenance_filter.value,
                    metadata=_parse_metadata_filter(self.metadata_filter.value))

    def refresh(self) -> DatasetReview:
        "Re-read the current entry (after a filter change, an edit, or changes made elsewhere)."
        try: filters = self.filters
        except ConfigError as e: return self._say(str(e), error=True)
        self.total = self.dataset.count(**filters)
        self.index = max(0, min(self.index, self.total - 1))
        found = self.dataset.entries(offset=self.index, limit=1, **filters) if self.total else []
        self.entry_ = found[0] if found else None
        self._armed = False
        self.delete_button.description, self.delete_button.button_style = 'Delete', ''
        self._loading = True
        try:
            self.position.max = max(1, self.total)
            self.position.value = self.index + 1
            self.counter.value = f"&nbsp;of {self.total} entr{'y' if self.total == 1 else 'ies'}"
            if self.entry_ is None:
                self.chat.value = '<i>no entries match</i>'
                self.output_text.value = self.tool_calls_text.value = ''
            else:
                out = self.entry_['messages'][-1]
                self.chat.value = render_entry(self.entry_)
                self.output_text.value = _text(out.get('content'))
                tcs = out.get('tool_calls')
                self.tool_calls_text.value = json.dumps(tcs, indent=1, ensure_ascii=False) if tcs else ''
                self.split_toggle.value = self.entry_['split']
            for w in (self.save_button, self.split_toggle, self.delete_button, self.output_text, self.tool_calls_text):
                w.disabled = self.entry_ is None
        finally: self._loading = False
        return self

    def _say(self, text: str, error: bool = False) -> DatasetReview:
        self.status.value = f"<span style='color:{'#dc2626' if error else '#059669'}'>{html.escape(text)}</span>"
        return self

    # -- actions (each one plain Dataset call) --------------------------------------------------------------
    def go(self, position: int) -> DatasetReview:
        "Show the entry at 1-based `position` among those matching the filters."
        self.index = int(position) - 1
        self.status.value = ''
        return self.refresh()

    def next(self) -> DatasetReview:
        "Show the next entry."
        return self.go(self.index + 2) if self.index + 1 < self.total else self._say('last entry')

    def prev(self) -> DatasetReview:
        "Show the previous entry."
        return self.go(self.index) if self.index > 0 else self._say('first entry')

    def edited_output(self) -> dict:
        "The assistant message the editor holds (raises `ConfigError` when the tool calls are not a JSON list)."
        text = self.output_text.value
        msg = {'role': 'assistant', 'content': text if text.strip() else None}
        raw = self.tool_calls_text.value.strip()
        if raw:
            try: tcs = json.loads(raw)
            except ValueError as e: raise ConfigError(f"tool calls: not valid JSON ({e})") from None
            if not isinstance(tcs, list): raise ConfigError("tool calls: must be a JSON list of tool calls")
            if tcs: msg['tool_calls'] = tcs
        return msg

    def save(self) -> DatasetReview:
        "Store the edited output (`Dataset.set_output`: provenance RELABELED_BY_HUMAN, old output kept in history)."
        if self.entry_ is None: return self._say('no entry to save', error=True)
        try: msg = self.edited_output()
        except ConfigError as e: return self._say(f"not saved: {e}", error=True)
        if msg == self._current_output(): return self._say('output unchanged')
        try: self.dataset.set_output(self.entry_['id'], msg)
        except (ValidationError, NotFoundError) as e:
            problems = getattr(e, 'problems', None)
            return self._say(f"not saved: {'; '.join(map(str, problems)) if problems else e}", error=True)
        self.refresh()
        return self._say('saved (RELABELED_BY_HUMAN)')

    def _current_output(self) -> dict:
        out = self.entry_['messages'][-1]
        return {'role': 'assistant', 'content': _text(out.get('content')) or None, **({'tool_calls': out['tool_calls']} if out.get('tool_calls') else {})}

    def set_split(self, split: str) -> DatasetReview:
        "Move the current entry to `split` (`Dataset.set_split`)."
        if self.entry_ is None: return self._say('no entry', error=True)
        if split == self.entry_['split']: return self
        self.dataset.set_split(self.entry_['id'], split)
        self.refresh()
        return self._say(f"moved to {split}")

    def delete(self, confirm: bool = False) -> DatasetReview:
        "Delete the current entry (`Dataset.delete_entries`); the first call arms, the second (or `confirm=True`) deletes."
        if self.entry_ is None: return self._say('no entry', error=True)
        if not (self._armed or confirm):
            self._armed = True
            self.delete_button.description, self.delete_button.button_style = 'Confirm delete', 'danger'
            return self._say('press Delete again to delete this entry')
        self.dataset.delete_entries([self.entry_['id']])
        self.refresh()
        return self._say('deleted')

    # -- events ---------------------------------------------------------------------------------------------
    def _on_filter(self, _):
        self.index = 0
        self.status.value = ''
        self.refresh()

    def _on_command(self, change):
        cmd = (change['new'] or '').strip().lower()
        if not cmd: return
        self.command.value = ''
        if cmd.isdigit(): self.go(int(cmd))
        elif cmd == 'n': self.next()
        elif cmd == 'p': self.prev()
        elif cmd == 's': self.save()
        elif cmd == 't' and self.entry_ is not None: self.set_split('TEST' if self.entry_['split'] == 'TRAIN' else 'TRAIN')
        elif cmd == 'd': self.delete()
        else: self._say(f"unknown command {cmd!r}: n, p, s, t, d or a position number", error=True)

    def _repr_mimebundle_(self, **kw):
        "The live widget in Jupyter; a one-line summary where widgets can't render (text, static docs)."
        bundle = self.widget._repr_mimebundle_(**kw) or {}
        if isinstance(bundle, tuple): bundle = bundle[0]
        return {**bundle, 'text/plain': repr(self)}
    def __repr__(self):
        return f"DatasetReview({self.dataset.name!r}, {self.index + 1 if self.total else 0}/{self.total})"

# %% [md]
# ## Using it
#
# A small dataset with a tool-call output and a rejected message:

# %%
lab = tempfile.mkdtemp()
logs = LogStore(f"{lab}/lab.db")
ds = Dataset.create('review-demo', store=logs)
tool = {'type': 'function', 'function': {'name': 'identify_capital', 'parameters': {'type': 'object', 'properties': {'capital': {'type': 'string'}}}}}
def qa(country, city, **kw): return {'messages': [{'role': 'user', 'content': f'Capital of {country}?'}, {'role': 'assistant', 'content': city}], **kw}
ds.add_entries([qa('Tasmania', 'Hobart', split='TRAIN', metadata={'prompt_id': 'capitals'}, rejected_message={'role': 'assistant', 'content': 'Paris'}),
                qa('Sweden', 'Stockholm', split='TEST'),
                {'messages': [{'role': 'user', 'content': 'Capital of Peru?'},
                              {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': '{"capital": "Lima"}'}}]}],
                 'tools': [tool], 'split': 'TRAIN', 'metadata': {'prompt_id': 'capitals'}}])
r = ds.review()
r

# %% [md]
# Static pages (like these docs) can't run widgets; this is the chat panel the widget shows for the first entry:

# %%
from IPython.display import HTML

# %%
HTML(r.chat.value)

# %% [md]
# Paging, filtering and the command box:

# %%
r.next()
test_eq(r.entry_['messages'][-1]['content'], 'Stockholm')
r.next_button.click()
test_eq(r.entry_['tools'], [tool])
test_eq(r.tool_calls_text.value.count('identify_capital'), 1)
r.next()
test_eq(r.status.value.endswith('last entry</span>'), True)
r.metadata_filter.value = 'prompt_id=capitals'
test_eq((r.total, r.index), (2, 0))
r.command.value = '2'
test_eq(r.entry_['messages'][0]['content'], 'Capital of Peru?')
r.command.value = 'p'
test_eq(r.entry_['messages'][0]['content'], 'Capital of Tasmania?')
r.metadata_filter.value = 'prompt_id'
assert 'write key=value' in r.status.value
r.metadata_filter.value = ''
print(r)

# %% [md]
# Editing the output stores it through `set_output`; an invalid edit is refused and reported, nothing stored:

# %%
r.go(1)
r.output_text.value = 'Hobart, Tasmania'
r.save_button.click()
stored = ds.entry(r.entry_['id'])
test_eq((stored['messages'][-1]['content'], stored['provenance'], stored['history'][-1]['output']['content']),
        ('Hobart, Tasmania', 'RELABELED_BY_HUMAN', 'Hobart'))
r.go(3)
r.tool_calls_text.value = '[{"id": "c1", "type": "function", "function": {"name": "identify_capital", "arguments": "{Lima"}}]'
r.save()
assert 'not saved' in r.status.value and 'arguments: not valid JSON' in r.status.value
test_eq(ds.entry(r.entry_['id'])['provenance'], 'UPLOAD')

# %% [md]
# Moving between splits and deleting (the first click arms, the second deletes):

# %%
r.split_toggle.value = 'TEST'
test_eq(ds.entry(r.entry_['id'])['split'], 'TEST')
r.command.value = 't'
test_eq(ds.entry(r.entry_['id'])['split'], 'TRAIN')
gone = r.entry_['id']
r.delete_button.click()
test_eq(len(ds), 3)
r.delete_button.click()
test_eq(len(ds), 2)
test_fail(lambda: ds.entry(gone), contains='no entry')
r.split_filter.value = 'TEST'
test_eq((r.total, r.entry_['messages'][-1]['content']), (1, 'Stockholm'))
print(r)

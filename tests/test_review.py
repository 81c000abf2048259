"""The review widget driven headlessly (clicks, edits, keyboard commands), asserting what ends up in the lab database."""
import json
import pytest
pytest.importorskip('ipywidgets')
from openpipe_lab.dataset import Dataset
from openpipe_lab.review import DatasetReview, render_entry

TOOL = {'type': 'function', 'function': {'name': 'identify_capital', 'parameters': {'type': 'object', 'properties': {'capital': {'type': 'string'}}}}}
CALL = {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': '{"capital": "Lima"}'}}]}


def qa(country, city, **kw):
    return {'messages': [{'role': 'user', 'content': f'Capital of {country}?'}, {'role': 'assistant', 'content': city}], **kw}


@pytest.fixture
def ds(lab):
    ds = Dataset.create('review', store=lab)
    ds.add_entries([qa('Tasmania', 'Hobart', split='TRAIN', metadata={'prompt_id': 'caps', 'lang': 'en'}),
                    qa('Sweden', 'Stockholm', split='TEST', metadata={'prompt_id': 'caps'}),
                    {'messages': [{'role': 'user', 'content': 'Capital of Peru?'}, CALL], 'tools': [TOOL], 'split': 'TRAIN'},
                    qa('Chile', '<b>Santiago</b>', split='TRAIN', rejected_message={'role': 'assistant', 'content': 'Lima'})])
    return ds


def stored(ds, entry_id): return ds.entry(entry_id)


def test_paging_and_rendering(ds):
    r = ds.review()
    assert isinstance(r, DatasetReview) and (r.total, r.index) == (4, 0) and r.position.max == 4
    assert 'Capital of Tasmania?' in r.chat.value and 'prompt_id=caps' in r.chat.value and r.output_text.value == 'Hobart'
    r.prev_button.click()
    assert r.index == 0 and 'first entry' in r.status.value
    r.next_button.click(); r.next_button.click()
    assert r.index == 2 and 'identify_capital(' in r.chat.value and '&quot;capital&quot;: &quot;Lima&quot;' in r.chat.value
    assert json.loads(r.tool_calls_text.value) == CALL['tool_calls'] and r.output_text.value == ''
    r.position.value = 4  # typing a position
    assert '&lt;b&gt;Santiago&lt;/b&gt;' in r.chat.value and '<b>Santiago</b>' not in r.chat.value  # escaped
    assert 'assistant · rejected' in r.chat.value
    r.next_button.click()
    assert r.index == 3 and 'last entry' in r.status.value
    assert repr(r) == "DatasetReview('review', 4/4)"


def test_filters(ds):
    r = ds.review(split='TEST')
    assert r.total == 1 and r.output_text.value == 'Stockholm'
    r.split_filter.value = None
    r.metadata_filter.value = 'prompt_id=caps, lang=en'
    assert r.total == 1 and r.output_text.value == 'Hobart'
    r.metadata_filter.value = 'lang'
    assert 'write key=value' in r.status.value
    r.metadata_filter.value = ''
    r.provenance_filter.value = 'RELABELED_BY_HUMAN'
    assert r.total == 0 and r.entry_ is None and 'no entries match' in r.chat.value and r.save_button.disabled
    r.save()
    assert 'no entry to save' in r.status.value
    r.provenance_filter.value = None
    assert r.total == 4 and r.index == 0 and not r.save_button.disabled


def test_edit_output_is_stored_as_human_relabel(ds):
    r = ds.review()
    eid = r.entry_['id']
    r.output_text.value = 'Hobart, Tasmania'
    r.save_button.click()
    e = stored(ds, eid)
    assert e['messages'][-1] == {'role': 'assistant', 'content': 'Hobart, Tasmania'}
    assert e['provenance'] == 'RELABELED_BY_HUMAN' and e['history'][0]['output'] == {'role': 'assistant', 'content': 'Hobart'}
    assert 'saved' in r.status.value and 'RELABELED_BY_HUMAN' in r.chat.value
    r.save()  # nothing changed: nothing stored
    assert 'unchanged' in r.status.value and len(stored(ds, eid)['history']) == 1
    # a tool-call output: edit the JSON arguments
    r.go(3)
    tcs = json.loads(r.tool_calls_text.value)
    tcs[0]['function']['arguments'] = '{"capital": "Lima, Peru"}'
    r.tool_calls_text.value = json.dumps(tcs)
    r.command.value = 's'
    e = stored(ds, r.entry_['id'])
    assert e['messages'][-1]['tool_calls'][0]['function']['arguments'] == '{"capital": "Lima, Peru"}' and e['messages'][-1]['content'] is None
    assert e['provenance'] == 'RELABELED_BY_HUMAN'


def test_invalid_edits_are_refused_and_nothing_is_stored(ds):
    r = ds.review()
    r.go(3)
    before = stored(ds, r.entry_['id'])
    r.tool_calls_text.value = '[{"id": "c1", "type": "function", "function": {"name": "identify_capital", "arguments": "{oops"}}]'
    r.save_button.click()
    assert 'not saved' in r.status.value and 'messages[1].tool_calls[0].function.arguments: not valid JSON' in r.status.value
    r.tool_calls_text.value = '{not json'
    r.save_button.click()
    assert 'tool calls: not valid JSON' in r.status.value
    r.tool_calls_text.value = ''; r.output_text.value = '   '
    r.save_button.click()
    assert 'needs content, tool_calls or function_call' in r.status.value
    assert stored(ds, r.entry_['id']) == before


def test_split_moves_and_delete_with_confirmation(ds):
    r = ds.review()
    eid = r.entry_['id']
    r.split_toggle.value = 'TEST'
    assert stored(ds, eid)['split'] == 'TEST' and len(ds.test) == 2
    r.command.value = 't'
    assert stored(ds, eid)['split'] == 'TRAIN'
    r.command.value = 'd'
    assert len(ds) == 4 and r.delete_button.description == 'Confirm delete'
    r.next_button.click()  # moving away disarms
    assert r.delete_button.description == 'Delete'
    r.command.value = 'p'
    r.delete_button.click(); r.delete_button.click()
    assert len(ds) == 3 and eid not in {e['id'] for e in ds.entries(limit=None)}
    assert r.total == 3 and r.entry_['messages'][0]['content'] == 'Capital of Sweden?'  # the next one slid in
    r.split_filter.value = 'TEST'
    r.command.value = 't'  # moves it out of the filtered view
    assert r.total == 0 and len(ds.test) == 0
    r.command.value = 'zzz'
    assert 'unknown command' in r.status.value


def test_widget_sees_changes_made_elsewhere(ds):
    r = ds.review()
    ds.set_output(r.entry_['id'], 'changed by a script')
    r.refresh()
    assert r.output_text.value == 'changed by a script'


def test_render_entry_shows_tool_results():
    entry = {'split': 'TRAIN', 'provenance': 'REQUEST_LOG', 'metadata': None, 'history': [{}], 'tools': [TOOL], 'rejected_message': None,
             'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'look'}, {'type': 'image_url', 'image_url': {'url': 'https://x/cat.png'}}]},
                          CALL, {'role': 'tool', 'tool_call_id': 'c1', 'content': 'ok'}, {'role': 'assistant', 'content': 'done'}]}
    h = render_entry(entry)
    assert '[image: https://x/cat.png]' in h and '(answers c1)' in h and '1 earlier output' in h and 'tools: identify_capital' in h

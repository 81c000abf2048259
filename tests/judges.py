"""Loopback judges for the criterion, eval and head-to-head tests: a `FakeUpstream` answering with a scripted responder,
registered in the lab as an OpenAI-compatible provider, and readers for the sections a judge is shown
(`criterion.judge_view`: `<name>` blocks whose values are JSON)."""
import contextlib, json, re
import pytest
from fakes import FakeUpstream


@pytest.fixture
def loopback_judge(lab, monkeypatch):
    "Factory: `loopback_judge(responder, name='judge')` -> a running FakeUpstream registered in `lab` as provider `name`."
    with contextlib.ExitStack() as stack:
        def make(responder, name='judge'):
            monkeypatch.setenv('FAKE_KEY', 'k')
            up = stack.enter_context(FakeUpstream(responder=responder))
            lab.add_provider(name, base_url=up.openai_url, api_key_env='FAKE_KEY')
            return up
        yield make


def block(text: str, tag: str) -> str | None:
    "The text inside the first `<tag>` ... `</tag>` section of a judge prompt, or None."
    m = re.search(rf'<{tag}>\n(.*?)\n</{tag}>', text, re.S)
    return m.group(1) if m else None


def shown_content(section: str) -> str:
    "The `content` of an assistant message as a judge is shown it (its JSON rendering)."
    return json.loads(section).get('content') or ''


def last_user_text(section: str) -> str:
    "The last message's content in a rendered `<messages>` section."
    return json.loads(section)[-1]['content']

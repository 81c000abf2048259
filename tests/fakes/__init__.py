"""Reusable loopback fakes of the OpenAI, Anthropic and Gemini HTTP APIs (see `upstream.py`).

From a test in `tests/` (pytest puts `tests/` on `sys.path`):

    from fakes import FakeUpstream, FakeOpenAI, Reply, fake_upstream   # importing the fixture enables it

    def test_x(fake_upstream):          # a fresh server per test, stopped afterwards
        fake_upstream.script(Reply(status=429))
        ...

`fake_providers` is the same server with ANTHROPIC_*/GEMINI_* keys and base URLs pointing at it, so a client's
`anthropic:...` and `gemini:...` model ids reach it too.
"""
import pytest
from .upstream import Reply, Received, FakeUpstream, FakeOpenAI, FakeAnthropic, FakeGemini

__all__ = ['Reply', 'Received', 'FakeUpstream', 'FakeOpenAI', 'FakeAnthropic', 'FakeGemini', 'fake_upstream', 'fake_providers']


@pytest.fixture
def fake_upstream():
    "A started `FakeUpstream` (all three APIs on one loopback port), stopped after the test."
    with FakeUpstream() as up: yield up


@pytest.fixture
def fake_providers(fake_upstream, monkeypatch):
    "`fake_upstream` with the Anthropic and Gemini keys and base URLs set, so `anthropic:`/`gemini:` model ids reach it."
    monkeypatch.setenv('ANTHROPIC_API_KEY', 'sk-ant-test')
    monkeypatch.setenv('ANTHROPIC_BASE_URL', fake_upstream.anthropic_url)
    monkeypatch.setenv('GEMINI_API_KEY', 'gem-test')
    monkeypatch.delenv('GOOGLE_API_KEY', raising=False)
    monkeypatch.setenv('GOOGLE_GEMINI_BASE_URL', fake_upstream.gemini_url)
    return fake_upstream

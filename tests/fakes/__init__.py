"""Reusable loopback fakes of the OpenAI, Anthropic and Gemini HTTP APIs (see `upstream.py`).

From a test in `tests/` (pytest puts `tests/` on `sys.path`):

    from fakes import FakeUpstream, FakeOpenAI, Reply, fake_upstream   # importing the fixture enables it

    def test_x(fake_upstream):          # a fresh server per test, stopped afterwards
        fake_upstream.script(Reply(status=429))
        ...
"""
import pytest
from .upstream import Reply, Received, FakeUpstream, FakeOpenAI, FakeAnthropic, FakeGemini

__all__ = ['Reply', 'Received', 'FakeUpstream', 'FakeOpenAI', 'FakeAnthropic', 'FakeGemini', 'fake_upstream']


@pytest.fixture
def fake_upstream():
    "A started `FakeUpstream` (all three APIs on one loopback port), stopped after the test."
    with FakeUpstream() as up: yield up

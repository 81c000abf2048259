"""Session fixtures for tests that need a real (tiny) model. Wire into tests/conftest.py with
`from conftest_tiny import *` (tests/ is on sys.path under pytest's default rootdir-relative import mode)."""
import os, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    "A tiny Qwen2 model + ChatML tokenizer folder (built once per session, ~8 s)."
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chatml", template="chatml")

@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory):
    "A tiny Llama model + Llama-3-style tokenizer folder (built once per session)."
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama3", template="llama3")

"Shared pytest fixtures: offline HF, a temporary lab per test, Postgres when available, and a no-orphans check."
import os, sys, time, pytest
from pathlib import Path

for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE'): os.environ[k] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('MPLBACKEND', 'Agg')
sys.path.insert(0, str(Path(__file__).parent))
import openpipe_lab.client  # noqa: F401,E402  (LogStore.openai/async_openai are defined by the client layer)

def package_at(rev: str, tmp_path_factory) -> str:
    "A directory holding `openpipe_lab/` as it was at git revision `rev` (for before/after tests): put it on PYTHONPATH."
    import subprocess
    d = tmp_path_factory.mktemp(f'pkg-{rev}')
    root = Path(__file__).resolve().parents[1]
    tar = subprocess.run(['git', '-C', str(root), 'archive', rev, 'openpipe_lab'], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(d)], input=tar, check=True)
    return str(d)

@pytest.fixture
def lab(tmp_path):
    "A fresh LogStore in a temporary directory, also made the default lab for the test (see tiny_model.default_lab)."
    from tiny_model import default_lab
    with default_lab(tmp_path) as store: yield store

@pytest.fixture
def pg_url():
    "A Postgres URL with an empty lab schema; skips (visibly) when OPENPIPE_LAB_TEST_PG is unset (.ci/run sets it)."
    url = os.environ.get('OPENPIPE_LAB_TEST_PG')
    if not url: pytest.skip('OPENPIPE_LAB_TEST_PG is not set: run .ci/run (it starts PostgreSQL) to include the Postgres tests')
    import sqlalchemy as sa
    from openpipe_lab.store import metadata
    eng = sa.create_engine(url)
    with eng.begin() as c: metadata.drop_all(c)
    eng.dispose()
    return url

def _children():
    try: import psutil
    except ImportError: return []
    kids = psutil.Process().children(recursive=True)
    return [p for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and not any('resource_tracker' in a or 'semaphore_tracker' in a for a in _cmdline(p))]

def _cmdline(p):
    try: return p.cmdline()
    except Exception: return []

@pytest.fixture(scope='session', autouse=True)
def no_orphan_processes():
    "Every subprocess a test starts (training workers, vLLM servers, graders) must be gone when the session ends."
    yield
    for _ in range(50):
        left = _children()
        if not left: return
        time.sleep(0.2)
    desc = [f"pid {p.pid}: {' '.join(_cmdline(p))[:200]}" for p in left]
    for p in left:
        try: p.kill()
        except Exception: pass
    pytest.fail(f"processes left running after the tests: {desc}")

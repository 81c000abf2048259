"""Execute notebooks in place, honouring nbdev's rules, so their saved outputs document the code.

Usage: python tools/execnbs.py nbs/03_logstore.ipynb [...]

Cells marked `#| eval: false` or with a test flag from settings.ini (`tst_flags`: gpu, net, slow) are not run
(and keep no output), exactly as `nbdev_test` skips them. Runs in the notebook's folder, then `nbdev_clean`s it.
"""
import os, re, subprocess, sys
from configparser import ConfigParser
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parent.parent
cfg = ConfigParser(); cfg.read(ROOT / 'settings.ini')
FLAGS = set(cfg['DEFAULT'].get('tst_flags', '').split())

def _skip(cell) -> bool:
    if cell.cell_type != 'code': return True
    for line in cell.source.splitlines():
        m = re.match(r'^\s*#\|\s*([\w-]+):?\s*(.*)$', line)
        if not m: continue
        key, val = m.group(1), m.group(2).strip().lower()
        if key == 'eval' and val == 'false': return True
        if key in FLAGS: return True
    return False

def run(path: Path):
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    cwd = os.getcwd(); os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=_skip)
    finally: os.chdir(cwd)
    write_nb(nb, path)
    subprocess.run([str(ROOT / '.venv' / 'bin' / 'nbdev_clean'), '--fname', str(path)], check=True)
    print(f'executed {path}')

if __name__ == '__main__':
    for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE'): os.environ[k] = '1'
    os.environ.setdefault('MPLBACKEND', 'Agg'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    for p in sys.argv[1:]: run(Path(p).resolve())

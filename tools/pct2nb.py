"""Author a notebook as a percent-format script, then turn it into `nbs/*.ipynb` (the source of truth).

Usage: python tools/pct2nb.py draft.py nbs/00_core.ipynb

`# %%` starts a code cell; `# %% [md]` starts a markdown cell whose following lines are taken verbatim.
Outputs are not produced here: run `tools/execnb.py` (or Jupyter) to fill them in.
"""
import json, sys, re
from pathlib import Path

def convert(src: str) -> dict:
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        text = '\n'.join(buf).strip('\n')
        if not text: return
        lines = text.split('\n')
        source = [l + '\n' for l in lines[:-1]] + [lines[-1]]
        if kind == 'markdown': cells.append({'cell_type': 'markdown', 'metadata': {}, 'source': source})
        else: cells.append({'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [], 'source': source})
    for line in src.split('\n'):
        m = re.match(r'^# %%( \[(md|markdown)\])?\s*$', line)
        if m:
            flush(); kind, buf = ('markdown' if m.group(1) else 'code'), []
        elif kind is not None: buf.append(line)
    flush()
    return {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}

if __name__ == '__main__':
    src, dst = sys.argv[1], sys.argv[2]
    Path(dst).write_text(json.dumps(convert(Path(src).read_text()), indent=1, ensure_ascii=False) + '\n')
    print(f'wrote {dst}')

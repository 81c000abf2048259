"""Author a notebook as a percent-format script, then turn it into `nbs/*.ipynb` (the source of truth).

Usage: python tools/pct2nb.py draft.py nbs/00_core.ipynb
       python tools/pct2nb.py --fix-md nbs/*.ipynb     # un-comment jupytext-style markdown cells in place

`# %%` starts a code cell; `# %% [md]` starts a markdown cell. Markdown lines are taken verbatim, except that a
cell whose every line is commented jupytext-style (`# text` or a bare `#`) is un-commented.
Cells get deterministic ids, so `nbdev_export` output is stable. Outputs are not produced here: run
`tools/execnbs.sh` to fill them in.
"""
import hashlib, json, re, sys
from pathlib import Path

def uncomment_md(text: str) -> str:
    lines = text.split('\n')
    if lines and all(re.match(r'^#( |$)', l) for l in lines if l.strip()):
        return '\n'.join(l[2:] if l.startswith('# ') else l[1:] for l in lines)
    return text

def _cell_id(i: int, kind: str, text: str) -> str:
    return hashlib.sha1(f'{i}:{kind}:{text}'.encode()).hexdigest()[:8]

def convert(src: str) -> dict:
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        text = '\n'.join(buf).strip('\n')
        if kind == 'markdown': text = uncomment_md(text).strip('\n')
        if not text: return
        lines = text.split('\n')
        source = [l + '\n' for l in lines[:-1]] + [lines[-1]]
        cid = _cell_id(len(cells), kind, text)
        if kind == 'markdown': cells.append({'cell_type': 'markdown', 'id': cid, 'metadata': {}, 'source': source})
        else: cells.append({'cell_type': 'code', 'execution_count': None, 'id': cid, 'metadata': {}, 'outputs': [], 'source': source})
    for line in src.split('\n'):
        m = re.match(r'^# %%( \[(md|markdown)\])?\s*$', line)
        if m:
            flush(); kind, buf = ('markdown' if m.group(1) else 'code'), []
        elif kind is not None: buf.append(line)
    flush()
    return {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}

def fix_md(path: Path) -> bool:
    nb = json.loads(path.read_text())
    changed = False
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        text = ''.join(c['source']); new = uncomment_md(text)
        if new != text:
            lines = new.split('\n'); c['source'] = [l + '\n' for l in lines[:-1]] + [lines[-1]]; changed = True
    if changed: path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return changed

if __name__ == '__main__':
    if sys.argv[1] == '--fix-md':
        for p in sys.argv[2:]:
            if fix_md(Path(p)): print(f'fixed markdown in {p}')
    else:
        src, dst = sys.argv[1], sys.argv[2]
        Path(dst).write_text(json.dumps(convert(Path(src).read_text()), indent=1, ensure_ascii=False) + '\n')
        print(f'wrote {dst}')

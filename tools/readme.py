"""Generate README.md from nbs/index.ipynb without Quarto (`make readme`; `make test` checks it is in sync).

Usage: python tools/readme.py [--nb nbs/index.ipynb] [--out README.md]

Markdown cells are copied verbatim; code cells become ```python blocks; their outputs become ``` blocks
(stream and text/plain; an object's text/markdown representation is copied as markdown). Cells marked `#| hide`
(or `#| include: false`) are skipped, `#| echo: false` keeps only the output, `#| output: false` only the code;
directive lines (`#| ...`) never appear. Relative links to notebooks (`05_client.ipynb`) are rewritten to
point into nbs/ (`nbs/05_client.ipynb`), since the README lives one level up. The output depends only on the
notebook, so running this twice leaves README.md unchanged.
"""
from __future__ import annotations
import argparse, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r'^\s*#\s?\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_HEADER = '<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, then run `make readme`. -->'

def _text(v) -> str: return ''.join(v) if isinstance(v, list) else (v or '')

def _directives(source: str) -> tuple[dict, str]:
    "Directive lines anywhere in a code cell (as nbdev allows) as a dict, and the code without them."
    opts, keep = {}, []
    for line in source.split('\n'):
        m = _DIRECTIVE.match(line)
        if m: opts[m.group(1)] = m.group(2)
        else: keep.append(line)
    return opts, '\n'.join(keep).strip('\n')

def _fence(text: str, lang: str = '') -> str:
    "A fenced block that survives backticks inside `text`."
    ticks = '```'
    while ticks in text: ticks += '`'
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"

def _output(o) -> str | None:
    kind = o.get('output_type')
    if kind == 'stream': text = _text(o.get('text'))
    elif kind in ('execute_result', 'display_data'):
        data = o.get('data') or {}
        if 'text/markdown' in data: return _text(data['text/markdown']).strip() or None
        text = _text(data.get('text/plain'))
    else: return None  # errors and widgets are not README material
    text = _ANSI.sub('', text).rstrip()
    return _fence(text) if text else None

def _nb_links(md: str, nbs_rel: str) -> str:
    "Relative links to notebooks, written from nbs/, rewritten to work from the repository root."
    if not nbs_rel: return md
    return re.sub(r'(\]\()(?![a-z][\w+.-]*:|/|#)([^)\s]*\.ipynb(?:#[^)\s]*)?\))', rf'\1{nbs_rel}/\2', md)

def render(nb: dict, nbs_rel: str = 'nbs') -> str:
    "README markdown for a notebook (a dict in nbformat 4)."
    blocks = [_HEADER]
    for c in nb.get('cells', []):
        src = _text(c.get('source'))
        if c.get('cell_type') == 'markdown':
            if src.strip(): blocks.append(_nb_links(src.strip('\n'), nbs_rel))
        elif c.get('cell_type') == 'code':
            opts, code = _directives(src)
            if 'hide' in opts or opts.get('include') == 'false' or 'default_exp' in opts: continue
            if code.strip() and opts.get('echo') != 'false': blocks.append(_fence(code, 'python'))
            if opts.get('output') != 'false':
                blocks += [b for b in map(_output, c.get('outputs') or []) if b]
    return '\n\n'.join(blocks).rstrip() + '\n'

_PLACEHOLDER = {'cells': [
    {'cell_type': 'markdown', 'id': '38c93b0c', 'metadata': {}, 'source': [
        '# openpipe_lab\n', '\n',
        '> The OpenPipe workflow in your notebook: log LLM requests, build datasets, fine-tune open models with TRL, '
        'serve them with vLLM and evaluate, on your own machine.\n', '\n',
        '```sh\n', 'make demo   # the whole loop on a CPU: logs -> dataset -> fine-tune -> deploy -> eval\n',
        'make test   # every notebook and test\n', '```\n', '\n',
        '*(Placeholder: the full story is written in `nbs/index.ipynb`.)*']}],
    'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
    'nbformat': 4, 'nbformat_minor': 5}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nb', default=str(ROOT / 'nbs' / 'index.ipynb'), help='source notebook')
    ap.add_argument('--out', default=str(ROOT / 'README.md'), help='where to write the README')
    a = ap.parse_args(argv)
    nb_path, out = Path(a.nb), Path(a.out)
    if not nb_path.exists():
        nb_path.parent.mkdir(parents=True, exist_ok=True)
        nb_path.write_text(json.dumps(_PLACEHOLDER, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
        print(f'{nb_path} did not exist: wrote a placeholder', file=sys.stderr)
    try: nb = json.loads(nb_path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        print(f'ERROR: cannot read {nb_path}: {e}', file=sys.stderr); return 1
    try: nbs_rel = Path(nb_path.resolve().parent).relative_to(out.resolve().parent).as_posix()
    except ValueError: nbs_rel = 'nbs'
    text = render(nb, '' if nbs_rel == '.' else nbs_rel)
    if not out.exists() or out.read_text(encoding='utf-8') != text:
        out.write_text(text, encoding='utf-8')
    return 0

if __name__ == '__main__':
    sys.exit(main())

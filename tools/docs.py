"""Build the offline HTML docs site in `_docs/` from `nbs/*.ipynb`, without Quarto (`make docs`).

Usage: python tools/docs.py [--out _docs] [NOTEBOOK ...]

Each notebook goes through nbdev's own doc processing (`nbdev.processors.FilterDefaults`: front matter, `show_doc`
for every exported function and class, hidden and export cells removed, doc links), the same step `nbdev_docs`
runs before Quarto. The processed cells are rendered here to static HTML: prose, code, saved outputs and the API
reference, with a navigation sidebar, an index page (from `nbs/index.ipynb`) and an API page listing every
public symbol. Nothing is fetched from the network.

The build fails (exit 1) when a notebook cannot be processed or when a public symbol (a name in a module's
`__all__`) appears nowhere in the docs: neither as a `show_doc` entry nor in code on some page.
The Quarto site is built by `.github/workflows/deploy.yaml` with nbdev's standard action.
"""
from __future__ import annotations
import argparse, ast, configparser, html, os, re, shutil, sys, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _settings(root: Path = ROOT) -> dict:
    cp = configparser.ConfigParser()
    cp.read(root / 'settings.ini')
    return dict(cp['DEFAULT'])

def notebooks(nbs: Path) -> list[Path]:
    "The notebooks to document: `nbs/**/*.ipynb` except hidden or `_`-prefixed paths, sorted."
    return sorted(p for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('.', '_')) for part in p.relative_to(nbs).parts))

# ---------------------------------------------------------------- nbdev processing

def process(path: Path):
    "Run nbdev's doc processors on one notebook; return the processed notebook (cells, frontmatter)."
    from execnb.nbio import read_nb
    from nbdev.processors import FilterDefaults
    import tempfile
    nb = read_nb(path)
    cwd, env = os.getcwd(), dict(os.environ)
    # as nbdev's own doc build: IN_TEST set, cwd at the notebook. A cell that opens the default lab gets a throwaway one.
    with tempfile.TemporaryDirectory(prefix='docs-lab-') as lab:
        os.environ.update(IN_TEST='1', OPENPIPE_LAB_DIR=lab, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
                          HF_DATASETS_OFFLINE='1', MPLBACKEND='Agg')
        os.environ.pop('OPENPIPE_LAB_DB', None)
        try:
            os.chdir(path.parent)
            FilterDefaults()(nb)
        finally:
            os.chdir(cwd)
            os.environ.clear(); os.environ.update(env)
    return nb

def page_name(path: Path) -> str:
    "The HTML file a notebook becomes: `index.html` for index, else `<default_exp>.html` (as nbdev names it) or `<stem>.html`."
    if path.stem == 'index': return 'index.html'
    import json
    for c in json.loads(path.read_text(encoding='utf-8')).get('cells', []):
        if c.get('cell_type') != 'code': continue
        m = re.search(r'^\s*#\|\s*default_exp\s+([\w.]+)', _join(c.get('source')), flags=re.M)
        if m: return m.group(1) + '.html'
    return path.stem + '.html'

def _join(v) -> str: return ''.join(v) if isinstance(v, list) else (v or '')

def frontmatter(nb) -> dict:
    "The YAML front matter nbdev puts in the first raw cell (title, description, output-file)."
    import yaml
    for c in nb.cells:
        if c.cell_type == 'raw':
            src = _join(c.source).strip()
            if src.startswith('---'):
                try: return yaml.safe_load(src.strip('-\n')) or {}
                except yaml.YAMLError: return {}
    return {}

# ---------------------------------------------------------------- rendering

_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def directives(source: str) -> tuple[dict, str]:
    "Leading `#| key: value` lines as a dict, and the source without them."
    lines, opts = source.split('\n'), {}
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m: break
        opts[m.group(1)] = m.group(2)
        i += 1
    return opts, '\n'.join(lines[i:]).strip('\n')

def slug(text: str) -> str:
    "Pandoc/Quarto heading id: lowercase, punctuation dropped (keeps `_-.`), spaces to `-`."
    text = html.unescape(re.sub(r'<[^>]+>', '', text)).strip().lower()
    text = re.sub(r'[^\w\s.-]', '', text)
    text = re.sub(r'\s+', '-', text)
    return re.sub(r'^[^a-z_]+', '', text) or 'section'

def highlight(code: str, lang: str = 'python') -> str:
    from pygments import highlight as _hl
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name, TextLexer
    try: lexer = get_lexer_by_name(lang or 'text')
    except Exception: lexer = TextLexer()
    return _hl(code, lexer, HtmlFormatter(nowrap=False, cssclass='highlight'))

def _markdown():
    import mistune
    class Renderer(mistune.HTMLRenderer):
        def heading(self, text, level, **attrs):
            return f'<h{level} id="{slug(text)}">{text}</h{level}>\n'
        def block_code(self, code, info=None):
            return highlight(code, (info or 'text').split()[0])
    return mistune.create_markdown(renderer=Renderer(escape=False), plugins=['table', 'strikethrough', 'url'])

class Site:
    "Renders processed notebooks to pages that share a sidebar, rewriting links to stay offline."
    def __init__(self, settings: dict, pages: dict):
        self.md = _markdown()
        self.pages = pages  # notebook file name -> output file name
        host = settings.get('doc_host', '').rstrip('/') + '/' + settings.get('doc_baseurl', '').strip('/')
        self.doc_prefix = host.rstrip('/') + '/'
        self.code_text: list[str] = []  # every piece of code shown, for the symbol check
        self.showdoc: set[str] = set()

    def links(self, text: str) -> str:
        "Make links to the published site relative, and `.ipynb` links point at their pages."
        if self.doc_prefix != '/': text = text.replace(self.doc_prefix, '')
        def nb_link(m):
            name = Path(m.group(2)).name
            return f'{m.group(1)}{self.pages.get(name, Path(name).stem + ".html")}{m.group(3) or ""}"'
        return re.sub(r'(href=")(?![a-z]+:)([^"#]*?\.ipynb)(#[^"]*)?"', nb_link, text)

    def markdown(self, text: str) -> str:
        text = re.sub(r'^:::.*$', '', text, flags=re.MULTILINE)  # Quarto fenced divs
        text = re.sub(r'(\]\([^)\s]*\))\{[^}\n]*\}', r'\1', text)  # Quarto link attributes {target=...}
        out = self.md(text)
        self.code_text += re.findall(r'<code[^>]*>(.*?)</code>', out, flags=re.S)
        return out

    def output(self, o, asis: bool) -> str:
        kind = o.get('output_type')
        if kind == 'stream':
            return f'<pre class="output stream {o.get("name", "")}">{html.escape(_ANSI.sub("", _join(o.get("text"))))}</pre>'
        if kind == 'error':
            tb = _ANSI.sub('', '\n'.join(o.get('traceback') or [f"{o.get('ename')}: {o.get('evalue')}"]))
            return f'<pre class="output error">{html.escape(tb)}</pre>'
        data = o.get('data') or {}
        if 'text/markdown' in data and (asis or 'text/html' not in data):
            return f'<div class="output markdown">{self.markdown(_join(data["text/markdown"]))}</div>'
        if 'text/html' in data: return f'<div class="output html">{_join(data["text/html"])}</div>'
        if 'image/svg+xml' in data: return f'<div class="output image">{_join(data["image/svg+xml"])}</div>'
        for mime in ('image/png', 'image/jpeg', 'image/gif'):
            if mime in data:
                b64 = _join(data[mime]).replace('\n', '')
                return f'<div class="output image"><img src="data:{mime};base64,{b64}" alt="output"></div>'
        if 'text/plain' in data: return f'<pre class="output">{html.escape(_ANSI.sub("", _join(data["text/plain"])))}</pre>'
        return ''

    def cell(self, c) -> str:
        src = _join(c.get('source'))
        if c.cell_type == 'markdown': return self.markdown(src)
        if c.cell_type != 'code': return ''
        opts, code = directives(src)
        if opts.get('include') == 'false': return ''
        parts = []
        for name in re.findall(r'^show_doc\(\s*([\w.]+)', code, flags=re.M): self.showdoc.add(name.split('.')[-1])
        if code and opts.get('echo') != 'false':
            self.code_text.append(code)
            parts.append(f'<div class="input">{highlight(code)}</div>')
        if opts.get('output') != 'false':
            parts += [self.output(o, opts.get('output') == 'asis') for o in c.get('outputs', [])]
        parts = [p for p in parts if p]
        return f'<div class="cell">{"".join(parts)}</div>' if parts else ''

    def page(self, nb, fm: dict, out_file: str, nav: list[tuple[str, str]], title: str) -> str:
        body = [self.cell(c) for c in nb.cells if c.cell_type != 'raw']
        body = self.links('\n'.join(b for b in body if b))
        desc = fm.get('description') or ''
        head = f'<h1 class="title">{html.escape(str(fm.get("title") or title))}</h1>'
        if desc: head += f'<p class="description">{self.md(str(desc)).strip().removeprefix("<p>").removesuffix("</p>")}</p>'
        return _PAGE.format(title=html.escape(str(fm.get('title') or title)), nav=_nav(nav, out_file), body=head + '\n' + body)

def _nav(nav: list[tuple[str, str]], current: str) -> str:
    items = ''.join(f'<li{" class=current" if f == current else ""}><a href="{f}">{html.escape(t)}</a></li>' for f, t in nav)
    return f'<a class="brand" href="index.html">openpipe_lab</a><ul>{items}</ul>'

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – openpipe_lab</title>
<link rel="stylesheet" href="style.css">
</head>
<body>
<nav class="sidebar">{nav}</nav>
<main>
{body}
</main>
</body>
</html>
"""

_CSS = """
body { margin: 0; font: 16px/1.55 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328; display: flex; }
.sidebar { position: sticky; top: 0; align-self: flex-start; height: 100vh; overflow-y: auto; width: 15rem; flex: none;
  padding: 1.2rem 1rem; box-sizing: border-box; background: #f6f8fa; border-right: 1px solid #d0d7de; }
.sidebar .brand { font-weight: 700; font-size: 1.15rem; color: #1f2328; text-decoration: none; }
.sidebar ul { list-style: none; padding: 0; margin: 1rem 0; } .sidebar li { margin: .3rem 0; }
.sidebar a { color: #0969da; text-decoration: none; } .sidebar li.current a { font-weight: 700; color: #1f2328; }
main { max-width: 56rem; padding: 1.5rem 2.5rem 4rem; min-width: 0; flex: 1; }
h1.title { margin-bottom: .2rem; } p.description { color: #59636e; font-size: 1.1rem; margin-top: 0; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
code { background: #eff1f3; padding: .1em .3em; border-radius: 4px; font-size: 88%; }
pre { overflow-x: auto; padding: .7rem .9rem; border-radius: 6px; font-size: 13.5px; line-height: 1.45; margin: .4rem 0; }
pre code { background: none; padding: 0; }
.cell { margin: 1rem 0; } .input .highlight pre { background: #f6f8fa; border: 1px solid #e1e4e8; }
pre.output { background: #fff; border-left: 3px solid #d0d7de; border-radius: 0; }
pre.output.error { border-left-color: #cf222e; color: #82071e; }
.output.markdown { border-left: 3px solid #0969da; padding-left: 1rem; }
.output.markdown h3, .output.markdown h4 { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
table { border-collapse: collapse; margin: .6rem 0; font-size: 14px; } th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
img { max-width: 100%; }
"""

# ---------------------------------------------------------------- public symbols

def public_symbols(lib: Path) -> dict[str, tuple[str, list[str]]]:
    "module name -> (the notebook it is exported from, names in its `__all__`), read without importing."
    res = {}
    for py in sorted(lib.rglob('*.py')):
        if py.name.startswith('_'): continue
        text = py.read_text(encoding='utf-8')
        m = re.search(r'File to edit: \.\./(?:[\w.-]+/)*?([\w.-]+\.ipynb)', text)
        names = []
        for node in ast.parse(text).body:
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == '__all__' for t in targets):
                    try: names += list(ast.literal_eval(node.value))
                    except ValueError: pass
        res['.'.join(py.relative_to(lib.parent).with_suffix('').parts)] = (m.group(1) if m else '', names)
    return res

def missing_symbols(symbols: dict, showdoc: set[str], code_text: list[str], built: set[str]) -> list[str]:
    "Public names (`module.name`) of the built notebooks that have no `show_doc` entry and appear in no code."
    words = set(re.findall(r'[A-Za-z_]\w*', html.unescape(' '.join(code_text))))
    return [f'{mod}.{n}' for mod, (nb, names) in symbols.items() if nb in built
            for n in names if n not in showdoc and n not in words]

def api_page(symbols: dict, anchors: dict[str, str], pages: dict[str, str]) -> str:
    "A markdown list of every public symbol, linked to its `show_doc` entry (or its page)."
    lines = ['Every public name, by module. Each links to its documentation.', '']
    for mod, (nb, names) in symbols.items():
        if not names or nb not in pages: continue
        page = pages[nb]
        lines += [f'## `{mod}`', '', f'From [{nb}]({page}).', '']
        lines += [f'- [`{n}`]({anchors.get(n, page)})' for n in names] + ['']
    return '\n'.join(lines)

# ---------------------------------------------------------------- build

def build(out: Path, only: list[str] | None = None, root: Path = ROOT, quiet: bool = False, verbose: bool = False) -> int:
    "Build the site into `out`; return the number of problems (0 = success)."
    from types import SimpleNamespace
    from execnb.nbio import mk_cell
    t0 = time.time()
    settings = _settings(root)
    nbs, lib = root / settings.get('nbs_path', 'nbs'), root / settings.get('lib_path', 'openpipe_lab')
    paths = notebooks(nbs)
    if only: paths = [p for p in paths if p.name in only or str(p) in only or p.stem in only]
    problems = 0
    processed = []
    for p in paths:
        try:
            nb = process(p)
        except Exception as e:
            cause = e.__cause__ or e
            print(f'ERROR processing {p.relative_to(root)}: {str(e).strip()}\n  -> {type(cause).__name__}: {cause}\n'
                  '  nbdev\'s doc build (here and in the Quarto deploy) runs exported cells, show_doc cells and every cell '
                  'containing an import: keep imports in cells of their own, with no other code.', file=sys.stderr)
            if verbose: traceback.print_exc()
            problems += 1; continue
        fm = frontmatter(nb)
        out_file = 'index.html' if p.stem == 'index' else str(fm.get('output-file') or page_name(p))
        title = str(fm.get('title') or p.stem)
        processed.append((p, nb, fm, out_file, title))
    pages = {p.name: f for p, _, _, f, _ in processed}
    nav = [(f, t) for p, _, _, f, t in processed if f == 'index.html']
    nav += [(f, t) for p, _, _, f, t in processed if f != 'index.html'] + [('api.html', 'API reference')]
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    site = Site(settings, pages)
    anchors = {}
    for p, nb, fm, out_file, title in processed:
        before = set(site.showdoc)
        (out / out_file).write_text(site.page(nb, fm, out_file, nav, title), encoding='utf-8')
        anchors.update({n: f'{out_file}#{n.lower()}' for n in site.showdoc - before})
    if 'index.html' not in pages.values():
        idx = SimpleNamespace(cells=[mk_cell('\n'.join(f'- [{t}]({f})' for f, t in nav if f != 'index.html'), 'markdown')])
        (out / 'index.html').write_text(site.page(idx, {'title': settings.get('title', 'openpipe_lab'),
            'description': settings.get('description', '')}, 'index.html', nav, 'index'), encoding='utf-8')
    symbols = public_symbols(lib)
    missing = missing_symbols(symbols, site.showdoc, site.code_text, {p.name for p, *_ in processed})  # before api.html
    api = SimpleNamespace(cells=[mk_cell(api_page(symbols, anchors, pages), 'markdown')])
    (out / 'api.html').write_text(site.page(api, {'title': 'API reference'}, 'api.html', nav, 'API reference'), encoding='utf-8')
    from pygments.formatters import HtmlFormatter
    (out / 'style.css').write_text(_CSS.lstrip() + HtmlFormatter(style='default').get_style_defs('.highlight') + '\n',
                                   encoding='utf-8')
    sys.stdout.flush()
    if missing:
        print(f'ERROR: {len(missing)} public symbols appear nowhere in the docs (add a show_doc, or mention them in '
              f'`code` in the notebook that exports them):\n  ' + '\n  '.join(missing), file=sys.stderr)
        problems += len(missing)
    if not quiet:
        print(f'wrote {len(processed) + 1} pages to {out} in {time.time() - t0:.1f}s'
              + (f' ({problems} problems)' if problems else ''), flush=True)
    return problems

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('notebooks', nargs='*', help='only these notebooks (names or paths); default: all')
    ap.add_argument('--out', default=None, help='output directory (default: doc_path from settings.ini, _docs)')
    ap.add_argument('--verbose', action='store_true', help='full tracebacks for notebooks that fail to process')
    a = ap.parse_args()
    out = Path(a.out) if a.out else ROOT / _settings().get('doc_path', '_docs')
    sys.exit(1 if build(out.resolve(), a.notebooks or None, verbose=a.verbose) else 0)

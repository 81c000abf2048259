"""The shape of the code, checked by `make test` (`make structure`): exported-cell sizes per notebook and import cycles.

Usage: python tools/structure.py [--nbs nbs] [--pkg openpipe_lab] [--cells] [--strict-cells]

Cell sizes: an exported cell is a code cell with `#| export` or `#| exporti`; its size is its lines without the
directive lines and without blank lines at its ends. A cell over 40 lines must say why in a comment line
starting with `# long:` (counted as part of the cell). Reported per notebook (median, largest, how many over 40);
`--strict-cells` also fails on a cell over 40 lines without its reason.

Imports: every import of one of the package's modules by another, wherever it stands (module level or inside a
function), `from . import x`, `from .x import y` and `import openpipe_lab.x` alike, makes an arrow; a cycle of
arrows fails the check and is printed with the line of each import. `__init__.py` (the package's lazy public
names) and `_modidx.py` (nbdev's index) are not modules of the graph.
"""
from __future__ import annotations
import argparse, ast, json, re, statistics, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r'^\s*#\s?\|\s*([\w-]+)')
LIMIT = 40

def _source(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def exported_cells(nb_path: Path) -> list[dict]:
    "Each exported code cell of a notebook: its index, size in lines and whether it gives a `# long:` reason."
    cells = json.loads(nb_path.read_text())['cells']
    out = []
    for i, cell in enumerate(cells):
        if cell['cell_type'] != 'code': continue
        lines = _source(cell).split('\n')
        directives = [m.group(1) for l in lines if (m := _DIRECTIVE.match(l))]
        if not {'export', 'exporti'} & set(directives): continue
        code = [l for l in lines if not _DIRECTIVE.match(l)]
        while code and not code[0].strip(): code.pop(0)
        while code and not code[-1].strip(): code.pop()
        reason = any(l.strip().lower().startswith('# long:') for l in code)
        first = next((l.strip() for l in code if l.strip() and not l.strip().startswith('#')), '')
        out.append({'index': i, 'lines': len(code), 'reason': reason, 'first': first[:60]})
    return out

def cell_report(nbs: Path) -> tuple[list[dict], list[dict]]:
    "Per-notebook size figures, and the cells over the limit that give no reason."
    rows, unexplained = [], []
    for nb in sorted(nbs.glob('*.ipynb')):
        cells = exported_cells(nb)
        if not cells: continue
        sizes = [c['lines'] for c in cells]
        over = [c for c in cells if c['lines'] > LIMIT]
        unexplained += [{'notebook': nb.name, **c} for c in over if not c['reason']]
        rows.append({'notebook': nb.name, 'cells': len(cells), 'median': statistics.median(sizes), 'max': max(sizes),
                     'over': len(over), 'unexplained': sum(not c['reason'] for c in over), 'sizes': sizes})
    return rows, unexplained

def _targets(node, module: str, modules: set[str], pkg: str) -> list[str]:
    "The package modules an import node names."
    if isinstance(node, ast.ImportFrom):
        if node.level == 1: base = node.module
        elif node.level == 0 and node.module and (node.module == pkg or node.module.startswith(pkg + '.')):
            base = node.module[len(pkg) + 1:] if node.module != pkg else None
        else: return []
        if base: return [base.split('.')[0]] if base.split('.')[0] in modules else []
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.Import):
        return [a.name.split('.')[1] for a in node.names if a.name.startswith(pkg + '.') and a.name.split('.')[1] in modules]
    return []

def import_graph(pkg_dir: Path) -> dict[str, dict[str, list[int]]]:
    "module -> {imported module: [line, ...]} for every import between the package's modules, at any depth."
    pkg = pkg_dir.name
    modules = {p.stem for p in pkg_dir.glob('*.py')} - {'__init__', '_modidx'}
    graph = {m: {} for m in modules}
    for m in sorted(modules):
        tree = ast.parse((pkg_dir / f'{m}.py').read_text(), filename=f'{pkg}/{m}.py')
        for node in ast.walk(tree):
            for t in _targets(node, m, modules, pkg):
                if t != m: graph[m].setdefault(t, []).append(node.lineno)
    return graph

def cycles(graph: dict) -> list[list[str]]:
    "The strongly connected components of more than one module (Tarjan), each sorted."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index: visit(v)
    return out

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nbs', default=str(ROOT / 'nbs'))
    ap.add_argument('--pkg', default=str(ROOT / 'openpipe_lab'))
    ap.add_argument('--cells', action='store_true', help='list every cell over the limit')
    ap.add_argument('--strict-cells', action='store_true', help=f'fail on a cell over {LIMIT} lines without a `# long:` reason')
    a = ap.parse_args(argv)
    rows, unexplained = cell_report(Path(a.nbs))
    every = sorted(s for r in rows for s in r['sizes'])
    print(f"exported cells: {len(every)}, median {statistics.median(every):g} lines, "
          f"{sum(s > LIMIT for s in every)} over {LIMIT} ({len(unexplained)} without a `# long:` reason)")
    for r in rows:
        print(f"  {r['notebook']:<22} {r['cells']:>4} cells  median {r['median']:>5g}  max {r['max']:>4}  over {LIMIT}: {r['over']}"
              + (f" ({r['unexplained']} unexplained)" if r['unexplained'] else ''))
    if a.cells:
        for c in unexplained: print(f"  {c['notebook']} cell {c['index']}: {c['lines']} lines, no reason: {c['first']}")
    pkg = Path(a.pkg)
    graph = import_graph(pkg)
    found = cycles(graph)
    failed = False
    if found:
        failed = True
        print(f"ERROR: {len(found)} import cycle(s) between modules of {pkg.name}/ (function-level imports count):")
        for comp in found:
            print(f"  cycle of {len(comp)}: {', '.join(comp)}")
            for m in comp:
                for t, lines in sorted(graph[m].items()):
                    if t in comp: print(f"    {pkg.name}/{m}.py:{lines[0]} imports {t}" + (f" (and {len(lines)-1} more)" if len(lines) > 1 else ''))
        print("  Fix: a method that returns a higher layer's object is defined in that layer's notebook (`@patch`), "
              "and shared helpers move down to the layer both use (see CONTRIBUTING.md, 'How to read this codebase').")
    else:
        print(f"imports: {sum(len(v) for v in graph.values())} arrows between {len(graph)} modules, no cycle")
    if a.strict_cells and unexplained:
        failed = True
        print(f"ERROR: {len(unexplained)} exported cell(s) over {LIMIT} lines without a `# long:` reason (run with --cells)")
    return 1 if failed else 0

if __name__ == '__main__':
    sys.exit(main())

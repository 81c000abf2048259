__version__ = "0.1.0"
"openpipe_lab: the OpenPipe workflow as a Jupyter-first library."

# Public objects load on first use, so `import openpipe_lab` stays fast (no torch, transformers, trl or vllm).
_LAZY = {'LogStore': 'logstore', 'LogQuery': 'logstore', 'get_store': 'logstore', 'Dataset': 'dataset',
         'FineTune': 'finetune', 'Deployment': 'deployment', 'Eval': 'eval', 'Criterion': 'criterion',
         'OpenPipeLabError': 'core'}

# Imports only run downward (tools/structure.py fails `make test` on a cycle). A method that returns a higher layer's
# object is defined by that layer and `@patch`ed onto the lower class: `logs.openai()` by client, `logs.dataset()` by
# dataset, `logs.serve()` by server, `ds.review()` by review, `ft.deploy()` by deployment, in-process training by train, best of N by criterion,
# `crit.align()` by alignment, `ev.head_to_head()` by pairwise. So a public name loads the modules that extend it too.
_EXTENDED_BY = {'logstore': ('client', 'dataset', 'server'), 'client': ('criterion',), 'dataset': ('review',),
                'finetune': ('train', 'deployment'), 'criterion': ('alignment',), 'eval': ('pairwise',)}

def _extend(module: str, name: str, seen: set) -> None:
    "Import the modules that add methods to `module`'s classes (and theirs), once each."
    from .core import lazy_attr
    for ext in _EXTENDED_BY.get(module, ()):
        if ext in seen: continue
        seen.add(ext)
        lazy_attr(__name__, '__name__', ext)   # a missing dependency of an extension is our MissingDependencyError too
        _extend(ext, name, seen)

def __getattr__(name):
    if name in _LAZY:   # a missing module or dependency is our MissingDependencyError (see core.lazy_attr)
        from .core import lazy_attr
        value = lazy_attr(__name__, name, _LAZY[name])
        _extend(_LAZY[name], name, {_LAZY[name]})
        return value
    raise AttributeError(f"module 'openpipe_lab' has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + list(_LAZY))

__version__ = "0.1.0"
"openpipe_lab: the OpenPipe workflow as a Jupyter-first library."

# Public objects load on first use, so `import openpipe_lab` stays fast (no torch, transformers, trl or vllm).
_LAZY = {'LogStore': 'logstore', 'LogQuery': 'logstore', 'get_store': 'logstore', 'Dataset': 'dataset',
         'FineTune': 'finetune', 'Deployment': 'deployment', 'Eval': 'eval', 'Criterion': 'criterion',
         'OpenPipeLabError': 'core'}

def __getattr__(name):
    if name in _LAZY:   # a missing module or dependency is our MissingDependencyError (see core.lazy_attr)
        from .core import lazy_attr
        return lazy_attr(__name__, name, _LAZY[name])
    raise AttributeError(f"module 'openpipe_lab' has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + list(_LAZY))

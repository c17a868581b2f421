"""Fault injection for the tests, loaded only when a test puts tests/hooks on PYTHONPATH.

FT_TEST_KILL_AT_RENAME=N   the process SIGKILLs itself just before its N-th rename (os.rename/os.replace, which
                           Path.rename/replace use): every moment at which a finished file could be committed.
FT_TEST_HIDE=pkg[,pkg]     those packages look uninstalled (import fails, importlib.util.find_spec is None),
                           e.g. a machine without bitsandbytes.
"""
import os
import signal
import sys

for _name in filter(None, os.environ.get("FT_TEST_HIDE", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]

_kill_at = int(os.environ.get("FT_TEST_KILL_AT_RENAME") or 0)
if _kill_at:
    _seen = [0]
    _rename, _replace = os.rename, os.replace

    def _tick() -> None:
        _seen[0] += 1
        if _seen[0] == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def rename(src, dst, *a, **kw):
        _tick()
        return _rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        _tick()
        return _replace(src, dst, *a, **kw)

    os.rename, os.replace = rename, replace

"""Register the PostgreSQL URL schemes with Kombu, without an import in user code.

Kombu has no plugin mechanism for transports: it resolves a URL scheme through the
``kombu.transport.TRANSPORT_ALIASES`` dict. The ``kombu_pg.pth`` file installed next to
the packages imports this module at interpreter start. Importing Kombu there would slow
every Python process down, so instead we wait for ``kombu.transport`` to be imported and
add our aliases right after it has executed.
"""
import importlib.machinery
import sys

SCHEMES = ("postgresql", "postgres", "pg")
TRANSPORT_PATH = "kombu_pg.transport:Transport"


def register(module) -> None:
    for scheme in SCHEMES:
        module.TRANSPORT_ALIASES.setdefault(scheme, TRANSPORT_PATH)


class _AfterImport:
    """A meta path finder that runs ``callback(module)`` right after ``target`` executes.

    Duck-typed rather than subclassing importlib.abc.MetaPathFinder: importing
    importlib.abc would cost every interpreter start about 10 ms.
    """

    def __init__(self, target: str, callback):
        self.target = target
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_then_register(module):
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_register
        return spec


def after_import(target: str, callback) -> None:
    """Call ``callback(module)`` once ``target`` is imported (now, if it already is)."""
    if target in sys.modules:
        callback(sys.modules[target])
    elif not any(getattr(f, "target", None) == target and getattr(f, "callback", None) is callback
                 for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(target, callback))


after_import("kombu.transport", register)

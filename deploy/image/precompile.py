"""Write bytecode for exactly the modules the service imports, and no other (image build step).

pip's default compiles every ``.py`` it installs: 26 MB of ``.pyc`` for the runtime's packages,
most of it for modules the service never imports (ONNX Runtime's tools, numpy's f2py, pydantic's
v1 shim...). Without any bytecode, start-up compiles in memory on every container start
(imports take 1.0-1.6 s instead of 0.5 s; a read-only root filesystem cannot cache them).
So the image is built with ``pip install --no-compile`` and this script, run at build time,
imports what a serving process imports, then compiles exactly those files (7-8 MB).

Unchecked-hash pycs: valid whatever the files' mtimes become when copied between build stages,
and the installed sources never change inside an image.

    python deploy/image/precompile.py         (with the service on sys.path)
"""

from __future__ import annotations

import importlib
import pkgutil
import py_compile
import sys
import warnings

# What uvicorn imports only once it runs (it resolves these names from strings at start-up).
RUNTIME_IMPORTS = (
    "uvicorn.loops.uvloop",
    "uvicorn.loops.asyncio",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.websockets_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl",
    "uvicorn.lifespan.on",
)


def import_everything() -> None:
    """Import every module of the service package, then uvicorn's late imports."""
    import service

    names = ["service"] + [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of modules we only import
        for name in [*names, *RUNTIME_IMPORTS]:
            importlib.import_module(name)


def main() -> None:
    import_everything()
    import service

    # The image's own files only: the installed packages (this venv) and the service itself,
    # not the base image's standard library (its own layer, compiled or not by its makers).
    roots = (sys.prefix + "/", service.__path__[0] + "/")
    n = 0
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py") and path.startswith(roots):
            py_compile.compile(path, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            n += 1
    print(f"precompile: {n} modules compiled")


if __name__ == "__main__":
    main()

"""segsem: contour extraction from CD-SEM images for OPC model calibration.

Plugins implement the hooks in :mod:`segsem_cli.hookspecs` with ``@hookimpl``::

    from segsem_cli import hookimpl

    @hookimpl
    def register_fallbacks(register):
        register(MyFallback())
"""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("segsem")

__all__ = ["hookimpl", "__version__"]

"""The whole plugin contract of segsem: one hook per extension point.

A plugin is a module (or object) listed in the ``segsem`` entry-point group of
its distribution's ``pyproject.toml``::

    [project.entry-points.segsem]
    my_fallback = "my_package.my_module"

and implements any of these hooks with ``@segsem_cli.hookimpl``. Each hook gets
a ``register`` callable; call it once per object you provide. The objects
follow the small protocols in :mod:`segsem_cli.protocols` (``Backbone``,
``Fallback``, ``Exporter``). segsem's own built-ins in ``plugins/`` use exactly
this mechanism.
"""
import pluggy

hookspec = pluggy.HookspecMarker("segsem")


@hookspec
def register_backbones(register):
    """Register segmentation backbones: ``register(backbone)`` with a :class:`~segsem_cli.protocols.Backbone`."""


@hookspec
def register_fallbacks(register):
    """Register classical contour extractors: ``register(fallback)`` with a :class:`~segsem_cli.protocols.Fallback`."""


@hookspec
def register_exporters(register):
    """Register output writers: ``register(exporter)`` with an :class:`~segsem_cli.protocols.Exporter`."""


@hookspec
def register_commands(app):
    """Add sub-commands to the ``segsem`` Typer application ``app`` (``@app.command()``)."""

"""``segsem plugins``: list registered backbones, fallbacks and exporters."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins_cmd():
        """List every registered backbone, fallback and exporter with the distribution that provides it.

        Example: segsem plugins

        Block plugins with SEGSEM_BLOCK_PLUGINS=name1,name2 (entry-point or distribution names).
        """
        from ..plugins import KINDS, get_registry

        reg = get_registry()
        table = Table(title="segsem plugins")
        for col in ("kind", "name", "plugin", "distribution", "version", "description"):
            table.add_column(col)
        for kind in KINDS:
            for name in reg.names(kind):
                p = reg.providers[kind][name]
                desc = getattr(reg.objects[kind][name], "description", "")
                table.add_row(kind, name, p.plugin, p.dist, p.version, desc)
        Console().print(table)

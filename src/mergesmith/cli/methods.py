"""`mergesmith methods [NAME]`: list the registered merge methods, or explain one."""

from __future__ import annotations

import click


@click.command("methods")
@click.argument("name", required=False)
@click.option(
    "--method-plugin", "plugins", multiple=True, help="Also load methods from this module or .py file."
)
def methods_cmd(name: str | None, plugins: tuple[str, ...]) -> None:
    """List merge methods, or show NAME's parameters and input rules."""
    from mergesmith.cli.main import run_cli

    def work() -> None:
        from mergesmith.methods import registry

        for plugin in plugins:
            registry.load_plugin(plugin)
        if name is None:
            for spec in registry.all_specs():
                click.echo(f"{spec.name:<18} {spec.summary}")
            return
        spec = registry.get(name)
        click.echo(f"{spec.name}: {spec.summary}")
        if spec.paper:
            click.echo(f"reference: {spec.paper}")
        base = {"required": "required", "optional": "optional", "ignored": "not used"}[spec.base]
        most = "any number" if spec.max_models is None else str(spec.max_models)
        click.echo(f"base model: {base}; models: {spec.min_models} to {most}")
        click.echo("parameters:")
        for p in spec.params:
            default = "required" if p.required else f"default {p.default!r}"
            click.echo(f"  {p.name:<12} {p.kind.__name__:<6} {p.scope:<9} {default:<16} {p.help}")

    run_cli(work, 0)

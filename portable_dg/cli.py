"""The `pdg` command line.

Commands live in their own modules and are imported only when run (or listed by --help), so
`pdg --help` and `pdg convert` never import MLX, torch or a GPU runtime.  User errors
(`PortableDGError`) print one line and exit 1; they never show a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import PortableDGError

# command name -> "module:attribute" of a click command
COMMANDS = {
    "generate": "portable_dg.commands.generate:generate",
    "info": "portable_dg.commands.info:info",
    "convert": "portable_dg.commands.convert:convert",
    "quantize": "portable_dg.commands.quantize:quantize",
    "imatrix": "portable_dg.commands.imatrix:imatrix",
    "sudoku": "portable_dg.commands.sudoku:sudoku",
    "synth": "portable_dg.commands.synth:synth",
    "bench": "portable_dg.commands.bench:bench",
    "eval": "portable_dg.commands.eval:eval_command",
    "serve": "portable_dg.commands.serve:serve",
    "chat": "portable_dg.commands.chat:chat",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PortableDGError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portable-dg", prog_name="pdg")
def main() -> None:
    """portable_dg: run, convert and measure block-diffusion language models (DiffusionGemma)."""


if __name__ == "__main__":
    sys.exit(main())

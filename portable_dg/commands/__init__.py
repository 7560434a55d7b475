"""One module per `pdg` subcommand (see portable_dg/cli.py)."""

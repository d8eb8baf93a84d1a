"""python -m dapt <command> [args]: see dapt.tools.commands."""

from dapt.tools.commands import console

raise SystemExit(console())

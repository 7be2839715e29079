"""CLI subcommands that live in their own module: each has `register(subparsers)` and `run(args, console)`.

cli.py lists them in COMMAND_MODULES; `run` returns the exit code and may raise NanscopeError (exit 2).
"""

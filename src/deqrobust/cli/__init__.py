"""The ``deqrobust`` command line. Each subcommand lives in its own module with ``register(subparsers)``
that adds its parser and sets ``func``; :mod:`.main` wires them. Imports everything above it."""

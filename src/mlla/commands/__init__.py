"""Subcommands of the ``mlla`` command, one module each (see :mod:`mlla.cli`)."""

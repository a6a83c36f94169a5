"""The ``ctsma`` command line: one module per subcommand, listed in :mod:`ctsma.cli.main`."""

"""The `mergesmith` command line: thin subcommands over the Python API."""

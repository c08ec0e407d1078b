"""The command-line tools behind ``python -m hiera_kernels``: bench, check, info."""

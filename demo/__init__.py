"""`python -m demo` (or `make demo`): a three-node cluster on this machine."""

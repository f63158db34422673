"""`python -m scaigrid` is the `scaigrid` command."""

from scaigrid.cli import main

main()

"""`scaigrid admin apply FILE.toml`: the catalogue, declaratively."""

import click

COMMANDS: list[click.Command] = []

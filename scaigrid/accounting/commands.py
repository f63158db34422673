"""`scaigrid admin set-limits`: per key, user, tenant or partner requests per minute."""

import click

COMMANDS: list[click.Command] = []

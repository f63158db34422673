"""The mariadb client commands a dump must not hold, found before a restore stops anything."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The mariadb client runs commands of its own from a script, not only SQL: `\!` and `system` run a shell, `\.` and
# `source` read another file, `\T`, `\P`, `connect`, `quit`... A dump made by mariadb-dump holds none but `\-`
# (which turns the client's sandbox on) and `DELIMITER ;;` / `DELIMITER ;` around triggers and routines. The load
# runs with --sandbox anyway; this finds them first, before anything is stopped, reading the dump as the client does
# (its add_line: strings, `/* */` comments but not `/*! */` ones, `#` and `-- ` comments, the delimiter).
CLIENT_COMMAND_WORDS = frozenset({
    "?", "charset", "clear", "connect", "edit", "ego", "exit", "go", "help", "nopager", "notee", "nowarning",
    "pager", "print", "prompt", "quit", "rehash", "sandbox", "source", "status", "system", "tee", "use", "warnings"})
HARMLESS_BACKSLASH = frozenset(b"N-")  # \N is NULL; \- turns the sandbox on
DUMP_DELIMITERS = (b";", b";;")
_FIRST_WORD = re.compile(rb"([A-Za-z]+|\?)(?=[ \t;]|$)")
_SPACES = re.compile(rb"\s*")
# Where the client's reading may change, by state: the rest of a line is skipped up to the next of these.
_CODE_SPECIAL = re.compile(rb"[\\'\"`#/*;-]")
_COMMENT_SPECIAL = re.compile(rb"[*/]")
BACKSLASH, BACKTICK, HASH, DASH = 0x5C, 0x60, 0x23, 0x2D
# How strings read depends on the sql_mode (NO_BACKSLASH_ESCAPES, ANSI_QUOTES and the modes including it): the
# reader follows the server's default, so a dump may set sql_mode only as mariadb-dump does, to other modes.
_SQL_MODE = re.compile(rb"sql_mode", re.IGNORECASE)
_DUMP_SQL_MODE = re.compile(
    rb"/\*!\d{5} SET (?:@OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='([A-Z_,]*)'|SQL_MODE=@OLD_SQL_MODE|"
    rb"@saved_sql_mode\s*=\s*@@sql_mode|sql_mode\s*=\s*'([A-Z_,]*)'|sql_mode\s*=\s*@saved_sql_mode) \*/\s*;",
    re.IGNORECASE)
STRING_MODES = frozenset({b"ANSI", b"ANSI_QUOTES", b"NO_BACKSLASH_ESCAPES", b"DB2", b"MAXDB", b"MSSQL", b"ORACLE",
                          b"POSTGRESQL"})


@dataclass
class _ClientReader:
    """The client's reading state across lines."""

    quote: int = 0  # the quote character of the string we are in, or 0
    comment: bool = False  # inside /* ... */
    conditional: bool = False  # inside /*! ... */, whose first */ does not end a comment nested in it
    statement_start: bool = True
    delimiter: bytes = b";"

    def command(self, line: bytes) -> str | None:
        """The first client command on this line, if any."""
        pos, end = 0, len(line)
        while pos < end:
            if self.statement_start and not (self.quote or self.comment):
                pos = _SPACES.match(line, pos).end()  # type: ignore[union-attr]  # \s* always matches
                if pos >= end:
                    return None
                if not _comment_start(line, pos):
                    self.statement_start = False
                    word = _FIRST_WORD.match(line, pos)
                    name = word.group(1).decode().lower() if word else ""
                    if word and name == "delimiter":
                        self.delimiter = line[word.end():].strip()
                        self.statement_start = True
                        return None if self.delimiter in DUMP_DELIMITERS else f"DELIMITER {self.delimiter!r}"
                    if name in CLIENT_COMMAND_WORDS:
                        return name
            found = self._special(line, pos)
            if found is None:
                return None
            pos = found
            char = line[pos]
            if not self.comment and char == BACKSLASH and self.quote != BACKTICK:
                if pos + 1 >= end:
                    return None if self.quote else "\\ at the end of a line"
                if not self.quote and line[pos + 1] not in HARMLESS_BACKSLASH:
                    return "\\" + chr(line[pos + 1])
                pos += 2
            elif not (self.comment or self.quote) and line.startswith(self.delimiter, pos):
                self.statement_start = True
                pos += len(self.delimiter)
            elif not (self.comment or self.quote) and (char == HASH or line.startswith(b"--", pos)):
                if char == DASH and pos + 2 < end and not line[pos + 2:pos + 3].isspace():
                    return "'--' not followed by a space"  # a comment to some client versions, not to others
                return None  # the rest of the line is a comment
            elif not self.quote and line.startswith(b"/*", pos) and not line.startswith((b"/*!", b"/*M!"), pos):
                if line.startswith(b"/*+", pos):
                    return "an optimizer hint"  # a comment to some client versions, not to others
                self.comment = True
                pos += 2
            elif self.comment and not self.conditional and line.startswith(b"*/", pos):
                self.comment = False
                pos += 2
            elif not self.quote and self.conditional and line.startswith(b"*/", pos):
                self.conditional = False
                pos += 2
            else:
                if not self.quote and line.startswith(b"/*!", pos):
                    self.conditional = True
                if char == self.quote:
                    self.quote = 0
                elif not (self.comment or self.quote) and char in b"'\"`":
                    self.quote = char
                pos += 1
        return None

    def _special(self, line: bytes, pos: int) -> int | None:
        """Where the next character that may change the reading is, from pos on."""
        if self.quote:
            found = [index for index in (line.find(bytes([self.quote]), pos),
                                         line.find(b"\\", pos) if self.quote != BACKTICK else -1) if index >= 0]
            return min(found) if found else None
        match = (_COMMENT_SPECIAL if self.comment else _CODE_SPECIAL).search(line, pos)
        return match.start() if match else None


def _comment_start(line: bytes, pos: int) -> bool:
    return line.startswith((b"#", b"--"), pos) or (
        line.startswith(b"/*", pos) and not line.startswith((b"/*!", b"/*M!"), pos))


def client_command(dump: Path) -> str | None:
    """The first mariadb client command in an SQL script, with its line number; None for a plain dump."""
    reader = _ClientReader()
    with dump.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip(b"\r\n")
            command = reader.command(line)
            if command is None and _SQL_MODE.search(line):
                dumped = _DUMP_SQL_MODE.fullmatch(line.strip())
                modes = set(b",".join(dumped.groups(b"")).upper().split(b",")) if dumped else set()
                if dumped is None or modes & STRING_MODES:
                    command = "an sql_mode other than mariadb-dump sets, changing how the client reads strings"
            if command is not None:
                return f"line {number}: {command}"
    return None

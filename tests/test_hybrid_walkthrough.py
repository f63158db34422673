"""docs/hybrid.md's walk-through ("From an unenrolled appliance to traffic both ways") run as printed: every command
of its blocks, in order, in a shell on the side its block names, against a managed stack and an unenrolled appliance;
only what an operator fills in is substituted (Sides.substitutions, the values printed before), and what the doc shows
a command printing is checked, down to traffic both ways."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance import devstack
from appliance.local import child_env
from scaigrid.settings import read_env_file
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import FakeBackend
from tests.hybrid_stacks import LINK_TIMEOUT_S, MANAGED_SETTINGS, NODE_SETTINGS, STREAM_BEHAVIOUR, STREAM_TEXT, data
from tests.support.waiting import eventually

DOC = Path(__file__).resolve().parents[1] / "docs" / "hybrid.md"
SECTION = "## From an unenrolled appliance to traffic both ways"
# A block's first line, `# on <side>`, says where it runs.
SIDES = ("the managed side", "the appliance", "a client of the managed side", "a client of the appliance")
# What a command prints for a later one to use: `sget_...` (the enrolment token), `hn_...` (the node id),
# `ten_...` (the tenant id), `sgk_...` (the tenant user's key). A doc line showing output captures it; a command
# gets what was captured.
PRINTED = re.compile(r"\b(sget|hn|ten|sgk)_\.\.\.")
# What the python example prints: the managed model's answer (the managed FakeBackend's stream), then a newline.
PYTHON_PRINTS = STREAM_TEXT + "\n"
# The module's two stacks start (20-60 s, by the machine's load) inside the walk's time.
pytestmark = pytest.mark.timeout(300)


@dataclass
class Command:
    side: str
    text: str  # as printed, continuation lines included
    python: bool = False
    expected: list[str] = field(default_factory=list)  # the lines the doc shows it printing

    def repeatable(self) -> bool:
        """Whether an operator may simply run it again until it shows what the doc shows (a link connecting, a
        snapshot arriving): reads and inference change nothing; creations would answer 409 the second time."""
        text = self.text
        return (self.python or "/oai/" in text or text.startswith("scaigrid-appliance status")
                or (text.startswith("curl ") and " -X " not in text and " -d " not in text))


def walkthrough() -> list[Command]:
    """The section's commands in order; `# ...` lines after a command are what it prints, and so is a trailing
    `# prints ...` on its line."""
    section = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands: list[Command] = []
    for language, body in re.findall(r"^```(sh|python)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL):
        first, *lines = body.splitlines()
        marker = re.fullmatch(r"# on (.+)", first)
        assert marker and marker[1] in SIDES, f"a block of the walk-through starts with where it runs: {first!r}"
        if language == "python":
            commands.append(Command(marker[1], "\n".join(lines), python=True))
            continue
        pending = ""
        for line in lines:
            if not pending and line.startswith("#"):
                assert commands and commands[-1].side == marker[1], f"output before a command: {line!r}"
                if line.strip("# ") != "...":  # "more lines here"
                    commands[-1].expected.append(line[1:].strip())
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.strip() and not pending.endswith("\\"):
                # A trailing `# prints ...`, which the shell ignores, is its output; not filled in, as nothing was
                # printed yet.
                command, _, prints = pending.partition("  # prints ")
                commands.append(Command(marker[1], command.rstrip(), expected=[prints] if prints else []))
                pending = ""
    return commands


@dataclass
class Sides:
    managed: ApplianceStack
    node: ApplianceStack
    managed_fake: FakeBackend
    node_fake: FakeBackend

    def substitutions(self, side: str) -> dict[str, str]:
        """What the operator writes in place of the doc's example names, on that side."""
        managed, node = self.managed.config, self.node.config
        return {
            "https://grid.example.com": self.managed.url,
            "grid.example.com:50443": f"127.0.0.1:{managed.grpc_tls_port}",  # the managed gRPC TLS port (nginx)
            "https://site-a.example": self.node.url,
            "/root/grid-ca.pem": str(managed.tls_cert),  # the managed side's CA, as the operator was given it
            "/etc/scaigrid": str((managed if side == "the managed side" else node).config_dir),
        }

    def environment(self, side: str) -> dict[str, str]:
        """A shell on that side: the appliance's virtualenv on the PATH, the side's configuration where its tools
        look for it, the admin key in $ADMIN_KEY (step 4), and a client trusting the side's TLS certificate."""
        env = child_env()
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        stack = self.managed if side.endswith("managed side") else self.node
        env["CURL_CA_BUNDLE"] = env["SSL_CERT_FILE"] = str(stack.config.tls_cert)
        if side == "the managed side":
            # What /etc/scaigrid/scaigrid.env, the scaigrid CLI's default, gives it on a managed appliance.
            env.update(read_env_file(self.managed.config.scaigrid_env_file))
            env["ADMIN_KEY"] = self.managed.admin_key
        elif side == "the appliance":
            env["SCAIGRID_APPLIANCE_CONFIG"] = str(self.node.appliance.path)
        return env


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB,
          s3_server: devstack.S3Server) -> Iterator[Sides]:
    """A managed stack and an appliance never enrolled, each with a model the walk-through names: `cloud/chat` on
    the managed side (step 5), `site/llama` on the appliance (step 6), each served by its own FakeBackend."""
    base = tmp_path_factory.mktemp("walk")
    with ExitStack() as cleanup:
        fakes, stacks = [], []
        for name, settings in (("managed", MANAGED_SETTINGS), ("node", NODE_SETTINGS)):
            fakes.append(FakeBackend().start())
            cleanup.callback(fakes[-1].stop)
            redis = devstack.start_redis(base / f"{name}-redis")
            cleanup.callback(redis.stop)
            stacks.append((base / name, redis, settings))
        with ThreadPoolExecutor(max_workers=2) as pool:
            starting = [pool.submit(start_stack, var, mariadb, redis, s3_server, **settings)
                        for var, redis, settings in stacks]
        for future in starting:  # every stack that started is stopped at the end, even if the other failed
            if future.exception() is None:
                cleanup.callback(future.result().stop)
        managed, node = (future.result() for future in starting)
        for stack, fake, backend_id, slug in ((managed, fakes[0], "cloud-fake", "cloud/chat"),
                                              (node, fakes[1], "site-fake", "site/llama")):
            data(stack, "POST", "/v1/backends", stack.admin_key, {
                "id": backend_id, "provider": "custom", "base_url": fake.url, "model": STREAM_BEHAVIOUR}, expect=201)
            data(stack, "POST", "/v1/models", stack.admin_key, {
                "slug": slug, "modality": "chat", "routes": [{"backend": backend_id}]}, expect=201)
        yield Sides(managed, node, *fakes)


def filled_in(text: str, substitutions: dict[str, str], printed: dict[str, str]) -> str:
    for example, value in substitutions.items():
        text = text.replace(example, value)

    def value_of(match: re.Match[str]) -> str:
        assert match[1] in printed, f"{match[0]} is used before a command printed it"
        return printed[match[1]]

    return PRINTED.sub(value_of, text)


def output_pattern(line: str, substitutions: dict[str, str], printed: dict[str, str]) -> re.Pattern[str]:
    """A doc line of output as a pattern: `...` is anything, a number any number, an example name its value, a
    printed value already known that value, and one not yet known is captured."""
    token = re.compile("|".join([
        f"(?P<example>{'|'.join(map(re.escape, substitutions))})", rf"(?P<printed>{PRINTED.pattern})",
        r"(?P<anything>\.\.\.)", r"(?P<number>\d+)", r"(?P<space>\s+)", r"(?P<other>.)"]))
    parts, captured = [], set()
    for match in token.finditer(line):
        kind = match.lastgroup
        if kind == "example":
            parts.append(re.escape(substitutions[match[0]]))
        elif kind == "printed":
            name = match[0].split("_", 1)[0]
            if name in printed:
                parts.append(re.escape(printed[name]))
            else:
                parts.append(f"(?P={name})" if name in captured else rf"(?P<{name}>{name}_[\w-]+)")
                captured.add(name)
        else:
            parts.append({"anything": ".*?", "number": r"\d+", "space": r"\s*"}.get(kind or "", "")
                         or re.escape(match[0]))
    return re.compile("".join(parts))


@dataclass
class Outcome:
    """One run of a command: true when it exited 0 and printed what the doc shows."""
    command: str
    returncode: int
    stdout: str
    stderr: str
    captured: dict[str, str]
    missing: str | None  # the first doc line of output not seen

    def __bool__(self) -> bool:
        return self.returncode == 0 and self.missing is None

    def __repr__(self) -> str:
        return (f"\n$ {self.command}\nexit {self.returncode}; expected and not printed: {self.missing!r}\n"
                f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}")


def run(command: Command, sides: Sides, printed: dict[str, str], cwd: Path) -> Outcome:
    substitutions = sides.substitutions(command.side)
    text = filled_in(command.text, substitutions, printed)
    argv = [sys.executable, "-c", text] if command.python else ["bash", "-c", text]
    result = subprocess.run(argv, env=sides.environment(command.side), cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    lines = iter(result.stdout.splitlines())
    captured: dict[str, str] = {}
    missing = None
    for shown in command.expected:  # in order, other lines between them allowed
        pattern = output_pattern(shown, substitutions, printed)
        match = next(filter(None, (pattern.fullmatch(line.strip()) for line in lines)), None)
        if match is None:
            missing = shown
            break
        captured.update(match.groupdict())
    if command.python and result.stdout != PYTHON_PRINTS:
        missing = PYTHON_PRINTS
    return Outcome(text, result.returncode, result.stdout, result.stderr, captured, missing)


def test_each_block_of_the_walkthrough_says_where_it_runs_and_each_value_is_printed_before_it_is_used() -> None:
    commands = walkthrough()
    assert [(c.side, " ".join(c.text.split()[:3])) for c in commands] == [
        ("the managed side", "scaigrid admin hybrid-token"),
        ("the appliance", "scaigrid-appliance link enroll"),
        ("the appliance", "scaigrid-appliance status"),
        ("the managed side", "curl -X POST"),  # the tenant
        ("the managed side", "curl -H \"Authorization:"),
        ("the managed side", "scaigrid admin create-key"),
        ("the managed side", "curl -X PUT"),
        ("a client of the appliance", "from openai import"),
        ("the managed side", "curl -X POST"),  # the hybrid backend
        ("the managed side", "curl -X POST"),  # the model routed to it
        ("a client of the managed side", "curl https://grid.example.com/oai/v1/chat/completions -H"),
    ]
    printed: set[str] = set()
    for command in commands:
        used = set(PRINTED.findall(command.text))
        assert used <= printed, f"{command.text!r} uses {used - printed} before a command printed it"
        printed |= {name for line in command.expected for name in PRINTED.findall(line)}
        # curl exits 0 on an error status too: what it must print is what shows the call worked.
        assert command.python or command.expected or not command.text.startswith("curl"), command.text


def test_the_walkthrough_runs_as_printed_from_an_unenrolled_appliance_to_traffic_both_ways(sides: Sides) -> None:
    printed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as cwd:  # nothing the commands name by a relative path is at hand
        for command in walkthrough():
            if command.repeatable():
                outcome = eventually(functools.partial(run, command, sides, printed, Path(cwd)),
                                     f"{command.text.splitlines()[0]} as the doc shows", timeout_s=LINK_TIMEOUT_S,
                                     interval_s=0.5)
            else:
                outcome = run(command, sides, printed, Path(cwd))
                assert outcome, outcome
            printed.update(outcome.captured)

    # Traffic both ways, each answered by the other side's own backend.
    assert sides.managed_fake.requests_for(STREAM_BEHAVIOUR), "step 5 never reached the managed model's backend"
    assert sides.node_fake.requests_for(STREAM_BEHAVIOUR), "step 6 never reached the appliance's model's backend"
    assert set(printed) == {"sget", "hn", "ten", "sgk"}

"""Wheels of this working tree under another version, for upgrade tests: good, broken, or uninstallable."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO

SOURCE = ("scaigrid", "migrations", "appliance", "setup.cfg", "pyproject.toml", "README.md")


def build_wheel(work: Path, version: str, *, broken: bool = False, python_requires: str = ">=3.11") -> Path:
    """A wheel of this working tree as `version`; a broken one's http mode dies as it starts; pip refuses to
    install one whose python_requires this Python does not meet."""
    source = work / f"src-{version}"
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    init = source / "scaigrid" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    setup_cfg = source / "setup.cfg"
    setup_cfg.write_text(re.sub(r"python_requires = \S+", f"python_requires = {python_requires}",
                                setup_cfg.read_text()))
    if broken:
        with (source / "scaigrid" / "modes" / "http.py").open("a") as module:
            module.write("\n\ndef run(settings):\n    raise RuntimeError('a deliberately broken build')\n")
    # No build isolation: the build needs no download, setuptools comes from this venv.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--ignore-requires-python", "--wheel-dir", str(work / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (work / "dist").glob(f"scaigrid-{version}-*.whl")
    return wheel

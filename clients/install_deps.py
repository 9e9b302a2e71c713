"""Install an image's dependencies into the running Python: pyproject's own, plus the extras named.

    python3 install_deps.py WHEELS [EXTRA ...]

WHEELS holds pyproject.toml and, when it was made (``make wheelhouse``), every wheel: then pip uses no
index at all (as an air-gapped board installs); without wheels pip resolves from its index. Both role
images run it (``clients/Dockerfile``: no extra; ``server/Dockerfile``: ``server``, for the report and
TensorBoard), so the two install alike and differ only by what their role needs.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

wheels, extras = Path(sys.argv[1]), sys.argv[2:]
project = tomllib.loads((wheels / "pyproject.toml").read_text())["project"]


def extra_requirements(extra: str) -> list[str]:
    """An extra's requirements, with the project's own extras it names (``odl-fed[data]``) spelt out."""
    found = []
    for requirement in project["optional-dependencies"][extra]:
        if requirement.startswith(project["name"] + "["):
            for inner in requirement.split("[", 1)[1].rstrip("]").split(","):
                found += extra_requirements(inner.strip())
        else:
            found.append(requirement)
    return found


wanted = list(project["dependencies"]) + [r for extra in extras for r in extra_requirements(extra)]
command = [sys.executable, "-m", "pip", "install", "--no-cache-dir", *wanted]
if any(wheels.glob("*.whl")):
    command += ["--no-index", "--find-links", str(wheels)]
sys.exit(subprocess.run(command).returncode)

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
wanted = list(project["dependencies"]) + [r for extra in extras for r in project["optional-dependencies"][extra]]
command = [sys.executable, "-m", "pip", "install", "--no-cache-dir", *wanted]
if any(wheels.glob("*.whl")):
    command += ["--no-index", "--find-links", str(wheels)]
sys.exit(subprocess.run(command).returncode)

"""Install an image's dependencies into the running Python: pyproject's own, plus the extras named.

    python3 install_deps.py WHEELS [EXTRA ...] [--added DIR]

WHEELS holds pyproject.toml and, when it was made (``make wheelhouse``), every wheel: then pip uses no
index at all (as an air-gapped board installs); without wheels pip resolves from its index. Both role
images run it (``clients/Dockerfile``: no extra; ``server/Dockerfile``: ``server``, for the report and
TensorBoard), so the two install alike and differ only by what their role needs.

With ``--added DIR``, the files this install adds to the environment are also copied under DIR at their
own absolute paths, so an image can take just them (``COPY --from=stage DIR/ /``) on top of a venv layer
it shares with the other role. An install that would remove files (an upgrade of a package already
there) cannot be taken that way and fails, naming them.
"""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

arguments = sys.argv[1:]
added = None
if "--added" in arguments:
    at = arguments.index("--added")
    added = Path(arguments[at + 1])
    del arguments[at:at + 2]
wheels, extras = Path(arguments[0]), arguments[1:]
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


def files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


environment = Path(sysconfig.get_paths()["data"])  # the venv's root (/opt/venv)
before = files(environment) if added is not None else {}
status = subprocess.run(command).returncode
if status == 0 and added is not None:
    after = files(environment)
    removed = sorted(set(before) - set(after))
    if removed:
        sys.exit(f"install_deps.py: the install removed {len(removed)} files of {environment} (e.g. {removed[0]}): "
                 f"an image cannot take it as an addition; install these extras in the shared stage instead")
    for path in sorted(p for p, stamp in after.items() if before.get(p) != stamp):
        target = added / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=False)
sys.exit(status)

"""Every test is run by some stage of CI: `make test-stages` (the first stage of .ci/run).

Reads the `make` stages from .ci/run, asks make for each one's pytest command (`make -n`), collects
what each selects (`pytest --collect-only`), and fails, naming them, if some collected test is
selected by none: a test marked so that every stage leaves it out would never run. Also names the
tests that two stages both run (allowed, but each costs its time twice).

    .venv/bin/python tests/stages.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci" / "run"
NODE = re.compile(r"^tests/\S+::\S+")


def ci_targets(script: Path = CI) -> list[str]:
    """The make targets .ci/run runs, in order (but this check's own)."""
    targets = [m.group(1) for m in re.finditer(r"^\s*make\s+([\w.-]+)", script.read_text(), flags=re.M)]
    return [t for t in targets if t != "test-stages"]


def pytest_commands(target: str) -> list[list[str]]:
    """The pytest commands `make TARGET` would run (from `make -n`; none for a stage without pytest)."""
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if " -m pytest" in line]


def collecting(command: list[str]) -> subprocess.Popen:
    """``command`` collecting only: node ids, one a line."""
    args = [a for a in command if a not in ("-q", "-qq", "-v", "--quiet", "--verbose")]
    return subprocess.Popen([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def node_ids(process: subprocess.Popen, what: str) -> set[str]:
    out, err = process.communicate()
    if process.returncode not in (0, 5):  # 5: nothing selected
        raise SystemExit(f"{what}: collection failed ({process.returncode}):\n{out[-3000:]}{err[-3000:]}")
    return {line.strip() for line in out.splitlines() if NODE.match(line.strip())}


def main() -> int:
    stages = {target: pytest_commands(target) for target in ci_targets()}
    everything = collecting([sys.executable, "-m", "pytest", "-m", ""])
    running = {(target, i): collecting(command) for target, commands in stages.items()
               for i, command in enumerate(commands)}
    selected: dict[str, set[str]] = {target: set() for target in stages}
    for (target, i), process in running.items():
        selected[target] |= node_ids(process, f"make {target} ({shlex.join(stages[target][i])})")
    every = node_ids(everything, "all tests (-m '')")
    for target, ids in selected.items():
        print(f"make {target}: {len(ids)} tests" + ("" if stages[target] else " (runs no pytest)"))
    print(f"collected without a marker filter: {len(every)} tests")
    union = set().union(*selected.values())
    for a in selected:
        for b in selected:
            if a < b and selected[a] & selected[b]:
                print(f"run by both make {a} and make {b}: {sorted(selected[a] & selected[b])}")
    missing = sorted(every - union)
    if missing:
        print(f"error: {len(missing)} test(s) run by no stage of {CI.relative_to(ROOT)}:", file=sys.stderr)
        for node in missing:
            print(f"  {node}", file=sys.stderr)
        return 1
    print(f"every test is run by a stage of {CI.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

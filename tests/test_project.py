"""The project's own entry points: compose file, CI script, README commands, the benchmark."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from bench import asi_layers

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_build_existing_files_and_run_real_commands():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"], "docker-compose.yml defines no service"
    for name, service in compose["services"].items():
        dockerfile = ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is missing"
        command = service["command"]
        assert command[:3] == ["python", "-m", "bench.asi_layers"]
        with pytest.raises(SystemExit) as info:  # the module's parser accepts the service's flags
            asi_layers.main([*command[3:], "--help"])
        assert info.value.code == 0


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make demo" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "-m pytest" in makefile and ".venv" in makefile


def test_benchmark_runs_end_to_end_on_a_tiny_setting(tmp_path):
    out = tmp_path / "bench.json"
    asi_layers.main(shlex.split(
        f"--models mobilenet_v2,resnet18 --batch 4 --image-size 64 --ranks 2 --hosvd-rank 2 "
        f"--steps 1 --warmup 1 --out {out}"))
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["mobilenet_v2", "resnet18"]
    for result in results:
        vanilla, asi, hosvd = result["rows"]
        assert vanilla["method"] == "vanilla" and asi["method"] == "asi" and hosvd["method"] == "hosvd"
        assert asi["convs_bytes"] == asi["tucker_limit_bytes"]
        assert asi["ratios"]["convs_bytes"] < 0.2 and asi["ratios"]["part_bytes"] < 0.5
        assert {"qr", "core"} <= set(asi["compression_s"]) and len(asi["compression_s"]) > 2


def test_benchmark_config_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bench.yaml"
    bad.write_text("models: [resnet18]\nbatchsize: 4\n")
    with pytest.raises(SystemExit, match=r"bench.yaml: unknown setting 'batchsize' \(did you mean 'batch'\?\)"):
        asi_layers.main(["--config", str(bad)])


def test_the_run_config_defaults_live_in_one_place():
    import tomllib

    from odl_fed.run_config import DEFAULTS

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS  # Flower reads pyproject; odl-fed reads DEFAULTS

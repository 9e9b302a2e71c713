"""The odl-fed command line: pretrain, then fine-tune from it; user mistakes are one error line."""

import json

import pytest

from odl_fed.cli import main
from odl_fed.training.methods import METHODS

FAST = ["--image-size", "32", "--limit-train", "256", "--limit-test", "128", "--epochs", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-digits.pt"
    assert main(["pretrain", "--model", "resnet18", "--dataset", "digits", "--lr", "3e-3", *FAST,
                 "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_writes_a_result_with_measured_bytes(checkpoint, tmp_path, method):
    out, plan = tmp_path / "result.json", tmp_path / "plan.json"
    code = main(["finetune", "--model", "resnet18", "--weights", str(checkpoint), "--dataset", "mnist-digits",
                 "--method", method, "--budget", "20KB", "--layers", "2", *FAST, "--out", str(out),
                 "--plan-out", str(plan)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["layers"] == ["layer4.1.conv1", "layer4.1.conv2"]
    assert 0 <= result["test_accuracy"] <= 1 and result["activation_bytes"] > 0
    if METHODS[method].plans_ranks:
        assert result["activation_bytes"] <= result["plan"]["total_bytes"] <= 20_000
        assert json.loads(plan.read_text())["model"] == "resnet18"


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "budget must be a positive size like 200KB or 1.5MiB, but got '0'"),
    (["--budget", "abc"], "(units: b, kb, mb, gb, kib, mib, gib), but got 'abc'"),
    (["--budget", "100"], "it needs at least"),
    (["--budget", "20KB", "--layers", "500"], "count must be an integer from 1 to 20"),
    (["--budget", "20KB", "--weights", "/nowhere/w.pt"], "weights file /nowhere/w.pt does not exist"),
    (["--method", "asi"], "--budget is needed with --method asi"),
])
def test_user_mistakes_are_one_clear_error(argv, message, capsys):
    try:
        code = main(["finetune", "--model", "resnet18", "--dataset", "digits", *FAST, *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_model_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--model", "vgg11", "--dataset", "digits"])
    assert "invalid choice: 'vgg11'" in capsys.readouterr().err

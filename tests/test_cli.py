"""The odl-fed command line: pretrain, then fine-tune from it; user mistakes are one error line."""

import functools
import json
import math

import pytest

from odl_fed import cli
from odl_fed.cli import main
from odl_fed.training.methods import METHODS

FAST = ["--image-size", "32", "--limit-test", "256", "--epochs", "1"]
BUDGET = 20_000
# The last two convs of ResNet-18 at 32 px see 1x1 maps of 512 channels: vanilla holds both inputs whole.
WHOLE_INPUTS = 2 * 32 * 512 * 4


@pytest.fixture(scope="module")
def digits_read_once():
    """The CLI reads each split of the bundled digits once for this module's eight runs (a read takes
    1.7 s here, ten times what a run's training takes); each run still takes its own subset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "load_dataset", functools.cache(cli.load_dataset))
        yield


@pytest.fixture(scope="module")
def checkpoint(digits_read_once, tmp_path_factory):
    """One epoch over 512 digits: a backbone whose features fine-tuning can use (test top-1 about 0.26
    as saved; its BatchNorm statistics are the digits')."""
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-digits.pt"
    assert main(["pretrain", "--model", "resnet18", "--dataset", "mnist-digits", "--lr", "1e-3", *FAST,
                 "--limit-train", "512", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def results(checkpoint, tmp_path_factory):
    """Every method fine-tuned from the checkpoint for one epoch over 256 digits, through the CLI."""
    root = tmp_path_factory.mktemp("finetune")
    found = {}
    for method in METHODS:
        out, plan = root / f"{method}.json", root / f"{method}-plan.json"
        code = main(["finetune", "--model", "resnet18", "--weights", str(checkpoint), "--dataset", "mnist-digits",
                     "--method", method, "--budget", "20KB", "--layers", "2", *FAST, "--limit-train", "256",
                     "--out", str(out), "--plan-out", str(plan)])
        found[method] = (code, json.loads(out.read_text()) if out.exists() else None, plan)
    return found


@pytest.mark.sweep  # every method through the CLI: the `results` fixture, 15 s together
@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_writes_a_result_with_measured_bytes(results, method):
    code, result, plan = results[method]
    assert code == 0
    assert result["method"] == method and result["layers"] == ["layer4.1.conv1", "layer4.1.conv2"]
    # it learned: chance is 0.1 and the checkpoint as saved about 0.26 (0.80-0.81 here after the epoch)
    assert result["test_accuracy"] >= 0.6, result["epochs"]
    if METHODS[method].plans_ranks:
        assert 0 < result["activation_bytes"] <= result["plan"]["total_bytes"] <= BUDGET
        assert json.loads(plan.read_text())["model"] == "resnet18"
    else:
        assert result["activation_bytes"] == WHOLE_INPUTS and not plan.exists()


def _core_sizes(result: dict) -> dict[str, int]:
    return {layer["name"]: math.prod(layer["ranks"]) for layer in result["plan"]["layers"]}


@pytest.mark.sweep
def test_the_methods_hold_what_each_promises(results):
    """Vanilla and gradient filtering hold the convs' whole inputs (1x1 maps leave gradfilt's patches
    nothing to pool), though gradfilt's step saves less; every method with a rank plan holds less than
    a sixth of that; narrower storage buys more rank than ASI's float32 with the same budget."""
    saved = {method: result["activation_bytes"] for method, (_, result, _) in results.items()}
    step = {method: result["step_saved_bytes"] for method, (_, result, _) in results.items()}
    assert saved["vanilla"] == saved["gradfilt"] == WHOLE_INPUTS and step["gradfilt"] < step["vanilla"]
    planned = [method for method in METHODS if METHODS[method].plans_ranks]
    assert {"asi", "asi-only", "hosvd", "asi-int8"} <= set(planned)
    assert all(6 * saved[method] < saved["vanilla"] for method in planned), saved
    asi = _core_sizes(results["asi"][1])
    for narrow in ("asi-fp16", "asi-int8"):
        sizes = _core_sizes(results[narrow][1])
        assert sizes.keys() == asi.keys() and all(sizes[name] > asi[name] for name in asi), (narrow, sizes, asi)


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

"""A board's own images (`python -m odl_fed.client --data DIR`, a job with `dataset: local`): the job's
fields, the folder's decoding and its cache, every kind of bad folder, and a fleet round in one process
where one board's folder cannot train (the real ServerApp and ClientApp; see test_schema.LocalGrid).

The pictures are real MNIST digits written as greyscale PNGs and RGB JPEGs (tests/image_folders.py).
"""

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from image_folders import digit_folder
from odl_fed.config.fleet import FleetError, load_fleet
from odl_fed.federation.server_app import run_server
from odl_fed.schema import ROUND_LOG, TRAINED_LAYERS_FILE, ClientKey, EndKey, GlobalKey, Metric, RoundKey, Status
from odl_fed.training import local_data
from odl_fed.training.local_data import LocalDataError, load_local
from processes import ROOT, env
from test_schema import LocalGrid

CLASSES = ["zero", "one", "two", "three"]
JOB = {"model": "mobilenet_v3_small", "layers": 1, "method": "vanilla", "rounds": 1, "clients-per-round": 3,
       "local-epochs": 1, "batch-size": 16, "lr": 0.01, "image-size": 32, "dataset": "local", "classes": CLASSES,
       "seed": 0}


def _fleet(tmp_path, **job) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 3}], "job": {**JOB, **job}}))
    return path


# -- the job ---------------------------------------------------------------------------------------

def test_a_local_job_keeps_its_classes_in_label_order(tmp_path):
    job = load_fleet(_fleet(tmp_path, classes=["cat", "dog", 7])).job
    assert job.dataset == "local" and job.classes == ("cat", "dog", "7")  # a folder named 7 reads as a number


@pytest.mark.parametrize("job, message", [
    ({"classes": None}, "job.classes: dataset 'local' needs classes: [name, ...]"),
    ({"dataset": "digits"}, "job.classes: only applies to dataset 'local'"),
    ({"classes": ["cat"]}, "job.classes: must be a list of at least 2 folder names"),
    ({"classes": ["cat", "a/b"]}, "job.classes: must be a list of at least 2 folder names"),
    ({"classes": ["cat", "dog", "cat"]}, "job.classes: ['cat'] listed more than once"),
    ({"partition": {"dirichlet": 0.5}}, "job.partition: does not apply to dataset 'local'"),
])
def test_local_job_mistakes_are_one_error_naming_the_field(tmp_path, job, message):
    fleet = _fleet(tmp_path, **job)
    if job.get("classes", "") is None:
        raw = yaml.safe_load(fleet.read_text())
        del raw["job"]["classes"]
        fleet.write_text(yaml.safe_dump(raw))
    with pytest.raises(FleetError, match=re.escape(message)) as error:
        load_fleet(fleet)
    assert str(error.value).startswith(f"{fleet}: job.")


# -- the folder ------------------------------------------------------------------------------------

def test_labels_follow_the_job_s_classes_whichever_a_board_holds(tmp_path):
    """A board holding only `two` and `zero` labels them 2 and 0 (their places in the job's list), not
    0 and 1 (their places among its folders); greyscale PNGs and RGB JPEGs alike come out RGB at the
    job's size."""
    digit_folder(tmp_path / "data", {"two": 2, "zero": 0}, per_class=4)
    local = load_local(tmp_path / "data", classes=CLASSES, image_size=24, cache_dir=tmp_path / "cache")
    data = local.data
    assert data.images.shape == (8, 3, 24, 24) and data.images.dtype == torch.uint8 and data.num_classes == 4
    assert sorted(data.labels.tolist()) == [0] * 4 + [2] * 4
    assert {p.suffix for p in (tmp_path / "data").rglob("*.*")} == {".png", ".jpg"}
    # a greyscale digit: the three channels agree, and it is not blank
    assert torch.equal(data.images[0, 0], data.images[0, 1]) and data.images[0].float().std() > 20
    assert not local.warnings and "8 image(s) of 2 of the job's 4 classes (none of ['one', 'three'])" in local.summary


def test_a_folder_is_decoded_once_and_read_from_the_board_s_disk_after(tmp_path, monkeypatch):
    digit_folder(tmp_path / "data", {"zero": 0, "one": 1}, per_class=6)
    first = load_local(tmp_path / "data", classes=CLASSES, image_size=32, cache_dir=tmp_path / "cache")
    assert first.decoded and first.cache_file.is_file()
    stamp = first.cache_file.stat().st_mtime_ns

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(local_data, "decode_image", no_decoding)
    local_data._read.cache_clear()  # as a fresh ClientApp process: nothing in memory, the file on disk
    second = load_local(tmp_path / "data", classes=CLASSES, image_size=32, cache_dir=tmp_path / "cache")
    assert not second.decoded and second.cache_file == first.cache_file
    assert first.cache_file.stat().st_mtime_ns == stamp
    assert torch.equal(second.data.images, first.data.images) and torch.equal(second.data.labels, first.data.labels)

    # a new picture (or another image size) is decoded again, and replaces the folder's older file
    monkeypatch.undo()
    digit_folder(tmp_path / "data", {"one": 1}, per_class=1, start=6)
    third = load_local(tmp_path / "data", classes=CLASSES, image_size=32, cache_dir=tmp_path / "cache")
    assert third.decoded and len(third.data) == 13 and not first.cache_file.exists()
    assert [p.name for p in (tmp_path / "cache").glob("*.pt")] == [third.cache_file.name]


def test_what_a_board_s_folder_may_hold_besides_its_images(tmp_path):
    """An unknown class folder, a stray text file, a file outside any class folder and an unreadable
    image are each skipped with a warning naming them; a greyscale PNG beside RGB JPEGs trains."""
    root = tmp_path / "data"
    digit_folder(root, {"zero": 0, "one": 1}, per_class=4, formats=("jpg",))
    digit_folder(root, {"one": 1}, per_class=1, start=4, formats=("png",))
    digit_folder(root, {"bird": 5}, per_class=2)
    (root / "zero" / "notes.txt").write_text("taken on the balcony")
    (root / "README").write_text("my pictures")
    (root / "one" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "zero" / ".DS_Store").write_bytes(b"\0\0")
    local = load_local(root, classes=CLASSES, image_size=32, cache_dir=tmp_path / "cache")
    assert len(local.data) == 9 and sorted(local.data.labels.tolist()) == [0] * 4 + [1] * 5
    unknown, strays, unreadable = local.warnings
    assert "class folder(s) ['bird'] are not among the job's classes" in unknown and "(2 image(s))" in unknown
    assert "2 file(s) skipped, not .jpg/.jpeg/.png images in a class folder: README, zero/notes.txt" in strays
    assert "1 image(s) could not be read and were skipped: one/broken.jpg (" in unreadable
    assert ".DS_Store" not in " ".join(local.warnings)


def test_any_image_mode_is_converted_to_rgb(tmp_path):
    root = tmp_path / "data" / "zero"
    root.mkdir(parents=True)
    Image.new("I;16", (40, 30), 4000).save(root / "deep.png")
    Image.new("RGBA", (16, 64), (255, 0, 0, 255)).save(root / "alpha.png")
    Image.new("P", (20, 20), 3).save(root / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "print.jpg")
    local = load_local(tmp_path / "data", classes=CLASSES, image_size=8, cache_dir=tmp_path / "cache")
    assert local.data.images.shape == (4, 3, 8, 8) and not local.warnings
    alpha = local.data.images[0]  # sorted by name: alpha, deep, palette, print
    assert alpha[:, 4, 4].tolist() == [255, 0, 0]
    assert local.data.images[1].min() == 255  # a flat 16-bit image at its brightest


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "has no class sub-folder"),
    (lambda root: (root / "zero").mkdir(parents=True), "its class folders ['zero'] hold no .jpg/.jpeg/.png image"),
    (lambda root: [(root / "zero").mkdir(parents=True), (root / "zero" / "a.txt").write_text("x")],
     "its class folders ['zero'] hold no .jpg/.jpeg/.png image"),
    (lambda root: digit_folder(root, {"bird": 1, "cat": 2}, per_class=1),
     "no image in any of the job's classes ['zero', 'one', 'two', 'three'] (its class folders: ['bird', 'cat']"),
    (lambda root: [(root / "one").mkdir(parents=True), (root / "one" / "a.png").write_bytes(b"\x89PNG broken")],
     "none of its 1 image(s) in the job's classes could be read (one/a.png ("),
])
def test_a_folder_nothing_can_train_on_is_one_error_naming_it(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(LocalDataError, match=re.escape(message)) as error:
        load_local(root, classes=CLASSES, image_size=32, cache_dir=tmp_path / "cache")
    assert str(root) in str(error.value)


@pytest.mark.process  # the client entry as a user starts it
@pytest.mark.parametrize("make, message", [
    (lambda root: None, "error: --data {root} does not exist"),
    (lambda root: [(root / "zero").mkdir(parents=True), (root / "zero" / "a.jpg").write_bytes(b"no jpeg"),
                   (root / "zero" / "b.txt").write_text("x")], "error: --data {root}: none of its 1 image(s) can be "
                                                           "read (zero/a.jpg)"),
])
def test_the_client_refuses_a_folder_nothing_can_train_on_before_it_joins(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    done = subprocess.run([sys.executable, "-m", "odl_fed.client", "--insecure", "--device", "rpi4", "--superlink",
                           "127.0.0.1:9", "--data", str(root)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert message.format(root=root) in errors[0]


# -- a fleet round in one process, one board's folder unusable ---------------------------------------

@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory):
    """Three boards on their own images (1 round): board 0 holds zero/one/two plus things to skip,
    board 1 two/three, board 2 only a class the job does not name. The server has no held-out images."""
    root = tmp_path_factory.mktemp("local-fleet")
    folders = [root / f"board-{i}" for i in range(3)]
    digit_folder(folders[0], {"zero": 0, "one": 1, "two": 2}, per_class=8)
    digit_folder(folders[0], {"bird": 7}, per_class=2)
    (folders[0] / "one" / "notes.txt").write_text("x")
    (folders[0] / "two" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    digit_folder(folders[1], {"two": 2, "three": 3}, per_class=8, start=8)
    digit_folder(folders[2], {"bird": 7}, per_class=4, start=2)
    fleet = _fleet(root)
    out = root / "out"
    config = {"fleet": str(fleet), "out-dir": str(out), "plan-cache": "", "round-timeout": 120}
    grid = LocalGrid(config)
    for i, (node, context) in enumerate(grid.contexts.items()):
        context.node_config = {"partition-id": i, "num-partitions": 3, "data-dir": str(folders[i])}
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flwr.odl_fed").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ODL_FED_DATA", str(root / "board-disk"))
            run_server(grid, config)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before
        logging.getLogger("flwr.odl_fed").removeHandler(handler)
    import json

    lines = [json.loads(text) for text in (out / ROUND_LOG).read_text().splitlines()]
    return {"lines": lines, "out": out, "logged": [r.getMessage() for r in records], "folders": folders,
            "root": root}


def test_a_fleet_on_its_boards_images_trains_around_a_board_that_cannot(local_fleet):
    lines = local_fleet["lines"]
    assert [line["event"] for line in lines] == ["run", "round", "round", "end"]
    round1 = lines[2]
    clients = {c[ClientKey.CLIENT]: c for c in round1[RoundKey.CLIENTS]}
    assert {name: c[ClientKey.STATUS] for name, c in clients.items()} == {
        "rpi4-0": Status.OK, "rpi4-1": Status.OK, "rpi4-2": Status.REFUSED}
    # each board holds out eval-fraction (0.2) of its images and scores the global model there, before and after
    assert clients["rpi4-0"][Metric.NUM_EXAMPLES] == 24 - 5 and clients["rpi4-1"][Metric.NUM_EXAMPLES] == 16 - 3
    assert clients["rpi4-0"][Metric.EVAL_EXAMPLES] == 5 and clients["rpi4-1"][Metric.EVAL_EXAMPLES] == 3
    assert all(0 <= clients[n][k] <= 1 for n in ("rpi4-0", "rpi4-1")
               for k in (Metric.EVAL_ACC_BEFORE, Metric.EVAL_ACC_AFTER))
    assert round1[RoundKey.AGGREGATED] == 2
    reason = clients["rpi4-2"][ClientKey.REASON]
    assert reason.startswith("its images cannot train: ") and str(local_fleet["folders"][2]) in reason
    assert "no image in any of the job's classes ['zero', 'one', 'two', 'three']" in reason
    # the server has no held-out images: rounds carry no global accuracy, and the run still ends
    assert all(GlobalKey.ACCURACY not in line[RoundKey.GLOBAL] for line in lines[1:3])
    assert lines[-1][EndKey.FINAL_ACCURACY] is None and lines[0]["job"]["classes"] == CLASSES
    # one output per job class, whichever classes each board held
    trained = torch.load(local_fleet["out"] / TRAINED_LAYERS_FILE, weights_only=True)
    head = list(trained.values())[-1]  # the head's bias, last of the trained layers
    assert head.shape == (len(CLASSES),)


def test_each_board_says_what_it_skipped_and_keeps_its_decoded_images(local_fleet):
    logged = "\n".join(local_fleet["logged"])
    board0 = str(local_fleet["folders"][0])
    assert f"{board0}: class folder(s) ['bird'] are not among the job's classes" in logged
    assert f"{board0}: 1 file(s) skipped, not .jpg/.jpeg/.png images in a class folder: one/notes.txt" in logged
    assert f"{board0}: 1 image(s) could not be read and were skipped: two/broken.png" in logged
    assert "rpi4-2: its images cannot train" in logged
    kept = sorted(p.name for p in (local_fleet["root"] / "board-disk" / ".decoded").glob("*.pt"))
    assert len(kept) == 2  # boards 0 and 1, decoded once each
    assert not os.listdir(local_fleet["folders"][1] / "two") == []  # the board's own folder is left as it was


# -- the deployed fleet on loopback: what the SuperLink held ----------------------------------------

def _patterns(folder, tmp_path) -> dict[str, bytes]:
    """Byte runs only a board's pictures hold: 32 bytes from the middle of each file as written, and
    from each image as decoded for training (its busiest row; decoded here as the board decodes it)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg")):
        raw = path.read_bytes()
        found[f"file {path.name}"] = raw[len(raw) // 2:len(raw) // 2 + 32]
    images = load_local(folder, classes=CLASSES, image_size=JOB["image-size"], cache_dir=tmp_path / "mine").data.images
    for i, image in enumerate(images):
        rows = image[0]  # (S, S) of the first channel
        row = int(rows.float().std(dim=1).argmax())
        found[f"decoded image {i}"] = bytes(image.permute(1, 2, 0)[row].flatten().tolist()[24:72])  # HWC, mid-row
        found[f"decoded image {i} (CHW)"] = bytes(rows[row].tolist())
    return found


class _StoreWatch:
    """Reads the SuperLink's --database files (the SQLite file and its write-ahead log) as raw bytes
    every few tenths of a second while the run goes on, without opening them as a database (no lock
    the SuperLink could meet), and notes which of ``patterns`` ever appeared there. Flower deletes a
    message's objects once delivered; their pages stay in the log or the file until reused, and are
    read meanwhile."""

    def __init__(self, database, patterns: dict[str, bytes]):
        import threading

        self.files = [database, database.with_name(database.name + "-wal")]
        self.patterns, self.found, self.reads = patterns, set(), 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.3):
            self.scan()

    def scan(self):
        for path in self.files:
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                continue
            self.reads += 1
            self.found |= {name for name, pattern in self.patterns.items() if pattern in content}

    def stop(self):
        self.done.set()
        self.thread.join(timeout=10)
        self.scan()


@pytest.mark.slow  # a deployed fleet: minutes of real processes (make test-slow)
@pytest.mark.process
def test_a_deployed_fleet_on_its_boards_images_sends_no_image_bytes(tmp_path):
    """A server with no held-out images and three client entries with --data on loopback, 2 rounds:
    two boards of different class mixes train, one whose folder holds no class of the job refuses each
    round, saying why, and the run ends for all (status 0). What the SuperLink stored while the run
    went on holds the clients' replies and not one byte run of any picture; each reply weighs what its
    trained layers weigh, plus a few KB."""
    from odl_fed.deploy.processes import free_port
    from odl_fed.federation.recorder import read_rounds
    from processes import start, stop_all, tree

    folders = [tmp_path / f"board-{i}" for i in range(3)]
    digit_folder(folders[0], {"zero": 0, "one": 1, "two": 2}, per_class=8)
    digit_folder(folders[0], {"bird": 7}, per_class=2)
    (folders[0] / "one" / "notes.txt").write_text("x")
    digit_folder(folders[1], {"two": 2, "three": 3}, per_class=8, start=8)
    digit_folder(folders[2], {"bird": 7}, per_class=4, start=2)
    fleet = _fleet(tmp_path, rounds=2)
    port, out = free_port(), tmp_path / "out"
    started, pids = [], set()
    # what only a reply holds (the check can see replies), and what only the boards' pictures hold
    patterns = {"reply": b"num-examples", "reply of rpi4-0": b"rpi4-0"}
    for i, folder in enumerate(folders[:2]):
        patterns |= {f"board {i}: {name}": pattern for name, pattern in _patterns(folder, tmp_path).items()}
    assert len(patterns) > 2 + 80
    watch = _StoreWatch(out / "superlink.db", patterns)
    try:
        server = start([sys.executable, "-m", "odl_fed.server", "--insecure", "--fleet", str(fleet), "--out-dir",
                        str(out), "--listen", f"127.0.0.1:{port}", "--plan-cache", str(tmp_path / "plans")],
                       tmp_path / "server.log")
        started.append(server)
        for i, folder in enumerate(folders):
            started.append(start([sys.executable, "-m", "odl_fed.client", "--insecure", "--device", "rpi4",
                                  "--superlink", f"127.0.0.1:{port}", "--data", str(folder), "--partition-id", str(i),
                                  "--data-root", str(tmp_path / f"disk-{i}"), "--reconnect-timeout", "10",
                                  "--connect-timeout", "300"], tmp_path / f"client-{i}.log"))
        import time

        deadline, moved = time.monotonic() + 900, False
        while server.poll() is None and time.monotonic() < deadline:
            for process in started:
                pids |= tree(process)
            if not moved and "round 0/2" in (tmp_path / "server.log").read_text():
                fleet.rename(tmp_path / "fleet-away.yaml")  # read by the server; no board may need it
                moved = True
            time.sleep(0.5)
        watch.stop()
        assert moved
        text = (tmp_path / "server.log").read_text()
        assert server.returncode == 0, text[-4000:]
        for i, process in enumerate(started[1:]):
            process.wait(timeout=90)
            said = (tmp_path / f"client-{i}.log").read_text()
            assert process.returncode == 0 and "Traceback" not in said, said[-3000:]
            assert "the run is over: 2 rounds, no global accuracy (the server did not evaluate" in said
        for i in (0, 1):  # each board scores the global model on its own held-out images, before and after
            said = (tmp_path / f"client-{i}.log").read_text()
            assert len(re.findall(r"round \d: ok, .*held-out top-1 [0-9.]+ -> [0-9.]+ on \d+", said)) == 2, said
        client0, client2 = ((tmp_path / f"client-{i}.log").read_text() for i in (0, 2))
        assert f"warning: {folders[0]}: 1 file(s) skipped, not .jpg/.jpeg/.png images" in client0
        # said by its ClientApp, in Flower's log of the client (--flower-log, beside its own log here)
        assert "class folder(s) ['bird'] are not among the job's classes" in \
            (tmp_path / "client-0.log.flower").read_text()
        assert "round 1: refused (its images cannot train: " in client2 and "round 2: refused" in client2

        rounds = read_rounds(out / ROUND_LOG)
        for line in rounds[1:]:
            clients = {c[ClientKey.CLIENT]: c for c in line[RoundKey.CLIENTS]}
            assert {n: c[ClientKey.STATUS] for n, c in clients.items()} == {
                "rpi4-0": Status.OK, "rpi4-1": Status.OK, "rpi4-2": Status.REFUSED}, clients
            assert all(0 <= clients[n][k] <= 1 and clients[n][Metric.EVAL_EXAMPLES] > 0 for n in ("rpi4-0", "rpi4-1")
                       for k in (Metric.EVAL_ACC_BEFORE, Metric.EVAL_ACC_AFTER))
            assert "no image in any of the job's classes" in clients["rpi4-2"][ClientKey.REASON]
            for name in ("rpi4-0", "rpi4-1"):  # a reply: the trained layers, plus a few KB of metrics and names
                assert clients[name][ClientKey.RECORD_BYTES_UP] - clients[name][ClientKey.BYTES_UP] < 16 * 1024
    finally:
        watch.stop()
        stop_all(started, pids)

    # The replies went through what was read (the check sees them) and no picture's bytes did,
    # as written or as decoded.
    assert watch.reads > 20
    assert {"reply", "reply of rpi4-0"} <= watch.found, watch.found
    assert watch.found == {"reply", "reply of rpi4-0"}, sorted(watch.found)
    # (and the decoded patterns are what a board holds: each is in its own decoded file)
    for i in range(2):
        (kept,) = (tmp_path / f"disk-{i}" / ".decoded").glob("*.pt")
        held = kept.read_bytes()
        assert all(pattern in held for name, pattern in patterns.items() if name.startswith(f"board {i}: decoded")
                   and name.endswith("(CHW)"))


# -- simulation: one folder per simulated client ----------------------------------------------------

@pytest.mark.parametrize("folders, message", [
    (1, "job.dataset: 'local' trains each client on its own images: give one --data DIR per client, in order "
        "(3 clients, 1 folder(s) given)"),
    (3, "--data {missing} does not exist"),
])
def test_a_simulated_local_fleet_needs_a_folder_per_client_before_anything_starts(tmp_path, capsys, folders,
                                                                                    message):
    from odl_fed.cli import main

    digit_folder(tmp_path / "a", {"zero": 0, "one": 1}, per_class=2)
    dirs = [tmp_path / "a", tmp_path / "a", tmp_path / "missing"][:folders]
    given = [arg for folder in dirs for arg in ("--data", str(folder))]
    assert main(["simulate", "--fleet", str(_fleet(tmp_path)), "--out-dir", str(tmp_path / "out"), "--no-progress",
                 *given]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("odl-fed simulate: error: "), err
    assert message.format(missing=tmp_path / "missing") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # Flower's simulation engine (Ray) for one round
def test_a_simulated_fleet_trains_each_client_on_its_own_folder(tmp_path, monkeypatch):
    from odl_fed.federation.simulation import simulate

    monkeypatch.setenv("ODL_FED_DATA", str(tmp_path / "disk"))
    digit_folder(tmp_path / "a", {"zero": 0, "one": 1}, per_class=6)
    digit_folder(tmp_path / "b", {"two": 2, "three": 3, "one": 1}, per_class=4, start=6)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}],
                                     "job": {**JOB, "clients-per-round": 2}}))
    log = simulate({"fleet": str(fleet), "out-dir": str(tmp_path / "out"), "plan-cache": "",
                    "data-dirs": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])}, progress=False,
                   cpus=2)
    from odl_fed.federation.recorder import read_rounds

    (round1,) = read_rounds(log)[1:]
    clients = {c[ClientKey.CLIENT]: c for c in round1[RoundKey.CLIENTS]}
    assert {n: (c[ClientKey.STATUS], c[Metric.NUM_EXAMPLES]) for n, c in clients.items()} == {
        "rpi4-0": (Status.OK, 10), "rpi4-1": (Status.OK, 10)}  # 12 images each, 2 held out to evaluate on

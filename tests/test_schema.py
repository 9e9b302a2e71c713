"""The round log's contract (odl_fed.schema): what the server writes is what the schema declares, and
every reader (run log, follower, round summary, console, TensorBoard, report) sees what was written.

The run is real, in one process: the ServerApp's ``run_server`` with the real strategy and recorder,
each train message handled by the real ClientApp (``handle_train``: planning and training a small
MobileNetV2 on scikit-learn's digits), through a grid that delivers them in place of a SuperLink.
Three clients are asked in round 1: ``rpi4`` trains, ``tiny`` is refused (it cannot hold the model)
and ``phone`` never answers (lost). Both the server and the clients evaluate (the default where the
server has a held-out split): ``rpi4`` reports its held-out top-1 before and after its fine-tuning.

A second run (``clients_run``) has only the clients evaluate, on a server that cannot read any
held-out split: two ``rpi4`` clients, two rounds.
"""

import io
import json

import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from odl_fed import schema
from odl_fed.dashboard.console import ConsoleDashboard, client_eval_text, plain_round_line
from odl_fed.dashboard.report import write_report
from odl_fed.dashboard.round_summary import format_bytes, summarise_round, summarise_rounds
from odl_fed.dashboard.run_log import LogFollower, load_run
from odl_fed.federation.client_app import handle_end, handle_join, handle_train
from odl_fed.federation.recorder import RoundRecorder, read_rounds
from odl_fed.federation.server_app import run_server
from odl_fed.schema import (
    END_QUERY,
    EVENT,
    JOIN_QUERY,
    ROUND_LOG,
    RUN_END_FILE_ENV,
    TRAIN_MESSAGE,
    AttemptKey,
    ClientEvalKey,
    ClientKey,
    EndKey,
    EndNotice,
    Event,
    GlobalKey,
    Metric,
    Outcome,
    Record,
    RoundKey,
    RunKey,
    Status,
)
from odl_fed.training.methods import METHODS

JOB = {"model": "mobilenet_v2", "layers": 2, "method": "asi", "rounds": 1, "clients-per-round": 3,
       "local-epochs": 1, "batch-size": 16, "lr": 0.01, "image-size": 32, "dataset": "digits", "partition": "iid",
       "seed": 0, "examples-per-client": 64, "eval-examples": 100}
DEVICES = ("rpi4", "tiny", "phone")  # partitions 0, 1, 2 = nodes 101, 102, 103
FIRST_NODE = 101
LOST_NODE = 103  # the phone: asked, never answers


class LocalGrid:
    """Flower's Grid in one process: a train message goes straight to the real ClientApp handler of its
    node (as a SuperLink would deliver it), and ``silent`` nodes never answer."""

    def __init__(self, run_config: dict, *, silent=(), devices=DEVICES):
        self.run_config = run_config
        self.silent = set(silent)
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=run_config,
                                       node_config={"partition-id": node - FIRST_NODE, "num-partitions": len(devices)})
                         for node in range(FIRST_NODE, FIRST_NODE + len(devices))}
        self.replies: list[tuple[dict, set]] = []  # each reply's ClientInfo and metric keys, as it was sent
        self.ended: list[int] = []  # the nodes told the run is over
        self.sent: dict[tuple[int, int], dict] = {}  # (round, node) -> the global trained layers it was sent

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if message.metadata.message_type == END_QUERY:
                self.ended.append(node)
                replies.append(handle_end(message, self.contexts[node]))
            elif message.metadata.message_type == JOIN_QUERY:
                replies.append(handle_join(message, self.contexts[node], self.run_config))
            else:
                server_round = int(message.content[Record.CONFIG]["server-round"])
                self.sent[(server_round, node)] = message.content[Record.ARRAYS].to_torch_state_dict()
                replies.append(reply := handle_train(message, self.contexts[node], self.run_config))
                # the strategy empties a reply's content once it is aggregated: what was sent is kept here
                self.replies.append(({name: dict(record) for name, record in reply.content.config_records.items()},
                                     {name: set(record) for name, record in reply.content.metric_records.items()}))
        return replies


def _serve(grid: LocalGrid, config: dict) -> str:
    """Run the real ServerApp over ``grid``; returns its console view as a non-terminal gets it."""
    console = io.StringIO()
    # what Flower's ServerApp runtime sets before the app runs (its messages carry the run and node)
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        run_server(grid, config, listeners=[ConsoleDashboard(console, live=False)])
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before
    return console.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    fleet = root / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": d, "count": 1} for d in DEVICES], "job": JOB}))
    out = root / "out"
    config = {"fleet": str(fleet), "out-dir": str(out), "plan-cache": "", "round-timeout": 60}
    grid = LocalGrid(config, silent={LOST_NODE})
    console = _serve(grid, config)
    lines = [json.loads(text) for text in (out / ROUND_LOG).read_text().splitlines()]
    return {"out": out, "lines": lines, "console": console, "replies": grid.replies, "ended": grid.ended,
            "contexts": grid.contexts}


def _by_event(lines, event):
    return [line for line in lines if line[EVENT] == event]


def _clients(run) -> dict[str, dict]:
    (last,) = [line for line in _by_event(run["lines"], Event.ROUND) if line[RoundKey.ROUND] == 1]
    return {c[ClientKey.CLIENT]: c for c in last[RoundKey.CLIENTS]}


def test_the_run_wrote_what_the_test_expects(run):
    """The premise of the reader tests: one trained, one refused, one lost client in round 1."""
    assert [line[EVENT] for line in run["lines"]] == [Event.RUN, Event.ROUND, Event.ROUND, Event.END]
    clients = _clients(run)
    assert {name: c[ClientKey.STATUS] for name, c in clients.items()} == {
        "rpi4-0": Status.OK, "tiny-1": Status.REFUSED, f"node-{LOST_NODE}": Status.LOST}
    ok = clients["rpi4-0"]
    assert ok[Metric.NUM_EXAMPLES] == JOB["examples-per-client"] and ok[ClientKey.DEVICE] == "rpi4"
    assert 0 < ok[Metric.PEAK_MEMORY] <= ok[Metric.MEMORY_BUDGET]


def test_every_reader_sees_what_the_writer_wrote(run):
    out, lines = run["out"], run["lines"]
    run_line, rounds, end = lines[0], _by_event(lines, Event.ROUND), lines[-1]
    clients = _clients(run)
    ok, refused = clients["rpi4-0"], clients["tiny-1"]
    accuracy = [r[RoundKey.GLOBAL][GlobalKey.ACCURACY] for r in rounds]

    # the recorder's own reader, the run log and the follower
    assert read_rounds(out / ROUND_LOG) == rounds
    log = load_run(out)
    assert log.run == run_line and log.rounds == rounds and log.end == end and not log.warnings
    assert log.planned_rounds == JOB["rounds"] and log.job[schema.JobKey.METHOD] == JOB["method"]
    assert LogFollower(out / ROUND_LOG).poll() == lines

    # the round summary (what every view shows)
    s0, s1 = summarise_rounds(log.rounds, log.run)
    assert [s0.accuracy, s1.accuracy] == accuracy and s1.round == 1
    assert (s1.asked, s1.trained, s1.refused, s1.failed, s1.lost) == (3, 1, 1, 0, 1)
    assert s1.statuses == {Outcome.TRAINED: 1, Outcome.REFUSED: 1, Outcome.FAILED: 0, Outcome.LOST: 1}
    devices = {d.device: d for d in s1.devices}
    rpi4 = devices["rpi4"]
    assert (rpi4.asked, rpi4.trained) == (1, 1) and (devices["tiny"].asked, devices["tiny"].trained) == (1, 0)
    assert rpi4.peak_bytes == ok[Metric.PEAK_MEMORY] and rpi4.budget_bytes == ok[Metric.MEMORY_BUDGET]
    ratio = ok[Metric.PEAK_MEMORY] / ok[Metric.MEMORY_BUDGET]
    assert rpi4.peak_ratio == pytest.approx((ratio, ratio, ratio))
    assert rpi4.activation_bytes == ok[Metric.ACTIVATION_BYTES] > 0
    assert rpi4.train_flops == ok[Metric.TRAIN_FLOPS] > 0 and rpi4.bytes_up == ok[ClientKey.BYTES_UP] > 0
    assert s1.bytes_up == rounds[1][RoundKey.BYTES_UP] == ok[ClientKey.BYTES_UP]
    assert s1.bytes_down == rounds[1][RoundKey.BYTES_DOWN] > 0
    assert s1.whole_model_bytes == run_line[RunKey.MODEL_BYTES] * (3 + 1)
    assert s1.reasons == {(Status.REFUSED, refused[ClientKey.REASON]): ["tiny-1"],
                          (Status.LOST, "no reply within the round's timeout"): [f"node-{LOST_NODE}"]}
    assert summarise_round(rounds[1], previous=rounds[0], run=run_line) == s1

    # the console view: live, as the server fed it, and from the file, as `odl-fed watch` reads it
    plain = io.StringIO()
    watcher = ConsoleDashboard(plain, live=False)
    for event in LogFollower(out / ROUND_LOG).poll():
        watcher(event)
    assert plain.getvalue() == run["console"]
    text = run["console"].splitlines()
    assert text[0].startswith(f"odl-fed: fleet {run_line[RunKey.FLEET]}: 3 clients (rpi4 x1, tiny x1, phone x1); "
                              f"asi on mobilenet_v2")
    assert text[1] == plain_round_line(s0, 1) and text[1].startswith(f"round 0/1 | starting model: accuracy "
                                                                     f"{accuracy[0]:.3f}")
    assert text[2] == plain_round_line(s1, 1)
    assert f"round 1/1 | accuracy {accuracy[1]:.3f}" in text[2]
    assert "trained 1/3 refused 1 failed 0 lost 1" in text[2] and "rpi4 1/1 tiny 0/1" in text[2]
    assert f"peak/budget {ratio:.2f}-{ratio:.2f}" in text[2]
    assert f"activations {format_bytes(ok[Metric.ACTIVATION_BYTES])}" in text[2]
    assert f"up {format_bytes(ok[ClientKey.BYTES_UP])}" in text[2]
    assert "refused x1 (tiny-1): " in text[2] and f"lost x1 (node-{LOST_NODE}): no reply" in text[2]
    assert text[3] == f"done: accuracy {end[EndKey.FINAL_ACCURACY]:.3f} after 1 rounds in {end[EndKey.ELAPSED]:.1f} s"

    # the clients' evaluation: rpi4-0's held-out top-1 before and after its fine-tuning, in the round line,
    # the summary and the console line
    before, after, held = ok[Metric.EVAL_ACC_BEFORE], ok[Metric.EVAL_ACC_AFTER], ok[Metric.EVAL_EXAMPLES]
    assert 0 <= before <= 1 and 0 <= after <= 1 and held == 96  # a fifth of its 479 examples
    assert ok[Metric.EVAL_TIME] > 0 and Metric.EVAL_ACC_BEFORE not in refused
    assert rounds[1][RoundKey.CLIENT_EVAL] == {ClientEvalKey.ACCURACY_BEFORE: before,
                                               ClientEvalKey.ACCURACY_AFTER: after,
                                               ClientEvalKey.GAIN: after - before, ClientEvalKey.EXAMPLES: held,
                                               ClientEvalKey.CLIENTS: 1}
    assert RoundKey.CLIENT_EVAL not in rounds[0]  # the starting model: no client trained
    assert (s1.client_before, s1.client_after, s1.client_gain, s1.client_eval_examples) == (before, after,
                                                                                            after - before, held)
    assert (rpi4.eval_before, rpi4.eval_after, rpi4.eval_examples) == (before, after, held)
    assert devices["tiny"].eval_before is None
    assert f" | clients' top-1 {before:.3f} -> {after:.3f} ({after - before:+.3f}) on {held} held out " \
           f"[rpi4 {before:.3f} -> {after:.3f} ({after - before:+.3f})] | " in text[2]

    # TensorBoard's event files (written by the server as the rounds landed)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / schema.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    assert scalars("global/accuracy") == pytest.approx({0: accuracy[0], 1: accuracy[1]})
    assert scalars("global/loss") == pytest.approx({r[RoundKey.ROUND]: r[RoundKey.GLOBAL][GlobalKey.LOSS]
                                                    for r in rounds})
    assert {k: scalars(f"clients/{k}")[1] for k in ("trained", "refused", "failed", "lost")} == {
        "trained": 1, "refused": 1, "failed": 0, "lost": 1}
    assert scalars("memory/peak-bytes/rpi4")[1] == pytest.approx(ok[Metric.PEAK_MEMORY])
    assert scalars("memory/peak-over-budget-max/rpi4")[1] == pytest.approx(ratio)
    assert scalars("activations/bytes/rpi4")[1] == pytest.approx(ok[Metric.ACTIVATION_BYTES])
    assert scalars("traffic/bytes-up")[1] == pytest.approx(ok[ClientKey.BYTES_UP])
    assert scalars("clients-eval/accuracy-before")[1] == pytest.approx(before)
    assert scalars("clients-eval/accuracy-after/rpi4")[1] == pytest.approx(after)
    assert scalars("clients-eval/gain/rpi4")[1] == pytest.approx(after - before)

    # the report: the page the server wrote, and Markdown
    page = (out / schema.REPORT_FILE).read_text()
    assert page == (write_report([out], out=out / "again.html")).read_text()
    assert f'data-value="{accuracy[1]!r}">{accuracy[1]:.3f}</td>' in page
    assert f'data-value="{ok[Metric.PEAK_MEMORY]}">{format_bytes(ok[Metric.PEAK_MEMORY])}</td>' in page
    assert f'data-value="{ok[Metric.MEMORY_BUDGET]}">{format_bytes(ok[Metric.MEMORY_BUDGET])}</td>' in page
    assert f'data-value="{ratio!r}"' in page
    assert '<td class="text" data-value="refused">refused</td><td class="text">tiny-1</td>' in page
    assert f'<td class="text">node-{LOST_NODE}</td>' in page
    assert f'data-value="{before!r}">{before:.3f}</td><td class="" data-value="{after!r}">{after:.3f}</td>' in page
    assert f">{after - before:+.3f}</td>" in page
    markdown = write_report([out], fmt="md", out=out / "report.md").read_text()
    assert (f"| 1 | {accuracy[1]:.3f} | {rounds[1][RoundKey.GLOBAL][GlobalKey.LOSS]:.4f} | 1 | 1 | 0 | 1 | "
            f"{format_bytes(rounds[1][RoundKey.BYTES_DOWN])} | {format_bytes(ok[ClientKey.BYTES_UP])} |") in markdown
    assert (f"| 1 | rpi4 | 1/1 | {ratio:.3f} | {ratio:.3f} | {ratio:.3f} | {format_bytes(ok[Metric.PEAK_MEMORY])} | "
            f"{format_bytes(ok[Metric.MEMORY_BUDGET])} | {format_bytes(ok[Metric.ACTIVATION_BYTES])} |") in markdown
    reason = refused[ClientKey.REASON].replace("|", "\\|").replace("\n", " ")
    assert f"| 1 | refused | tiny-1 | {reason} |" in markdown
    assert f"| {before:.3f} | {after:.3f} | {after - before:+.3f} |" in markdown


def _keys(typed_dict) -> set[str]:
    return set(typed_dict.__annotations__)


def test_what_the_writer_emits_is_what_the_schema_declares(run, tmp_path):
    lines = run["lines"]
    run_line, (round0, round1), end = lines[0], _by_event(lines, Event.ROUND), lines[-1]
    assert set(run_line) == _keys(schema.RunLine)
    assert {schema.JobKey.MODEL, schema.JobKey.METHOD, schema.JobKey.ROUNDS} <= set(run_line[RunKey.JOB])
    optional = {RoundKey.SKIPPED}  # only in a round that asked no one
    assert set(round0) == _keys(schema.RoundLine) - optional - {RoundKey.CLIENT_EVAL}  # no client evaluated
    assert set(round1) == _keys(schema.RoundLine) - optional
    assert set(round1[RoundKey.CLIENT_EVAL]) == _keys(schema.ClientEvalMetrics)
    for line in (round0, round1):
        assert set(line[RoundKey.GLOBAL]) == _keys(schema.GlobalMetrics)
    assert set(end) == _keys(schema.EndLine)

    clients = _clients(run)
    ok, refused, lost = clients["rpi4-0"], clients["tiny-1"], clients[f"node-{LOST_NODE}"]
    entry, metrics = _keys(schema.ClientEntry), _keys(schema.ClientMetrics)
    assert set(ok) == (entry - {ClientKey.REASON}) | metrics  # a client that trained sends every metric
    assert set(refused) == entry - {ClientKey.BYTES_UP, ClientKey.RECORD_BYTES_UP} | {Metric.TRAIN_MEMORY,
                                                                                      Metric.SERVER_ROUND}
    assert set(lost) == {ClientKey.CLIENT, ClientKey.NODE, ClientKey.STATUS, ClientKey.BYTES_DOWN, ClientKey.REASON}
    (attempt,) = ok[ClientKey.ATTEMPT_LOG]
    assert set(attempt) == _keys(schema.AttemptEntry) and attempt[AttemptKey.STATUS] == Status.OK
    assert refused[ClientKey.PLAN] is None and refused[ClientKey.ATTEMPT_LOG] == []

    # what travels between the ClientApp and the ServerApp
    assert len(run["replies"]) == 2
    for config_records, metric_records in run["replies"]:
        assert set(config_records) == {Record.CLIENT} and set(metric_records) == {Record.METRICS}
        assert set(config_records[Record.CLIENT]) == _keys(schema.ClientInfo)
        assert metric_records[Record.METRICS] <= metrics
    statuses = {c[ClientKey.STATUS] for r in (round0, round1) for c in r[RoundKey.CLIENTS]}
    assert statuses <= set(schema.names(Status))

    # a resumed run's line, through the same recorder
    recorder = RoundRecorder(tmp_path / ROUND_LOG, resume=(run_line, [round0]))
    recorder.end_run()
    resumed = [json.loads(text) for text in (tmp_path / ROUND_LOG).read_text().splitlines()]
    assert [line[EVENT] for line in resumed] == [Event.RUN, Event.ROUND, Event.RESUME, Event.END]
    assert set(resumed[2]) == _keys(schema.ResumeLine) and resumed[2][schema.ResumeKey.FROM_ROUND] == 0


def test_every_node_that_answers_is_told_the_run_is_over_and_its_entry_reads_it(run, tmp_path, monkeypatch):
    """The end notice goes to every node after the last round (the lost one is asked too, and never
    answers); a ClientApp whose entry named a file writes the notice there, whole. The notice goes
    through the ClientApp's own dispatch, whose mod notes each message's type (a warm launcher's record
    names the message each child handled from it)."""
    assert run["ended"] == [node for node in run["contexts"] if node != LOST_NODE]
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from odl_fed.federation import client_app

    assert TRAIN_MESSAGE == MessageType.TRAIN

    path = tmp_path / "run-ended.json"
    monkeypatch.setenv(RUN_END_FILE_ENV, str(path))
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        notice = Message(RecordDict({Record.CONFIG: ConfigRecord({EndNotice.ROUNDS: 1, EndNotice.ACCURACY: 0.5})}),
                         dst_node_id=FIRST_NODE, message_type=END_QUERY)
        reply = client_app.app(notice, run["contexts"][FIRST_NODE])
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before
    assert json.loads(path.read_text()) == {EndNotice.ROUNDS: 1, EndNotice.ACCURACY: 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["run-ended.json"]  # no partial file left behind
    assert client_app.handled[-1] == END_QUERY and not reply.has_error()


def test_each_key_namespace_names_exactly_its_declared_fields():
    for event, (typed_dict, keys) in schema.LINE_TYPES.items():
        assert {EVENT, *schema.names(keys)} == _keys(typed_dict), event
    assert set(schema.names(ClientKey)) - {ClientKey.ERROR} == _keys(schema.ClientEntry)
    assert {ClientKey.CLIENT, ClientKey.DEVICE, ClientKey.STATUS, ClientKey.ERROR, ClientKey.PLAN,
            ClientKey.ATTEMPT_LOG} == _keys(schema.ClientInfo)
    assert set(schema.names(Metric)) == _keys(schema.ClientMetrics)
    assert set(schema.names(AttemptKey)) == _keys(schema.AttemptEntry)
    assert set(schema.names(GlobalKey)) == _keys(schema.GlobalMetrics)
    assert set(schema.names(ClientEvalKey)) == _keys(schema.ClientEvalMetrics)
    assert set(schema.names(Event)) == set(schema.LINE_TYPES)
    assert set(Status.FAILED) < set(schema.names(Status))
    assert len(set(schema.names(Metric))) == len(schema.names(Metric))


def test_the_methods_registry_holds_the_schema_method_names():
    assert tuple(METHODS) == schema.METHOD_NAMES
    assert all(name == method.name for name, method in METHODS.items())


# A round line as the recorder wrote it before odl_fed.schema existed (spelled out, not from the schema).
OLD_LOG = "\n".join([
    '{"event": "run", "time": 1.0, "fleet": "f.yaml", "job": {"model": "resnet18", "method": "asi", "rounds": 1}, '
    '"clients": 2, "devices": {"rpi4": 2}, "trained_convs": ["layer4.1.conv2"], "trained_bytes": 10, '
    '"model_bytes": 100, "settings": {}}',
    '{"event": "round", "round": 0, "time": 2.0, "elapsed": 1.0, "global": {"accuracy": 0.1, "loss": 2.3, '
    '"examples": 50, "eval-time": 0.5}, "clients-asked": 0, "bytes-down": 0, "record-bytes-down": 0, '
    '"bytes-up": 0, "record-bytes-up": 0, "aggregated": 0, "failed": 0, "clients": []}',
    '{"event": "round", "round": 1, "time": 3.0, "elapsed": 4.0, "global": {"accuracy": 0.4, "loss": 1.5, '
    '"examples": 50, "eval-time": 0.5}, "clients-asked": 2, "bytes-down": 20, "record-bytes-down": 22, '
    '"bytes-up": 10, "record-bytes-up": 11, "aggregated": 1, "failed": 1, "clients": ['
    '{"client": "rpi4-0", "node": 7, "device": "rpi4", "status": "ok", "bytes-down": 10, "num-examples": 64, '
    '"peak-memory": 300, "memory-budget": 400, "activation-bytes": 5, "train-flops": 1000000000.0, '
    '"bytes-up": 10, "record-bytes-up": 11}, '
    '{"client": "rpi4-1", "node": 8, "device": "rpi4", "status": "memory-exceeded", "bytes-down": 10, '
    '"peak-memory": 500, "memory-budget": 400, "reason": "over"}]}',
    '{"event": "end", "time": 5.0, "elapsed": 4.0, "final_accuracy": 0.4, "rounds": 1}', ""])


def test_a_log_written_before_the_schema_reads_the_same(tmp_path):
    (tmp_path / "rounds.jsonl").write_text(OLD_LOG)
    log = load_run(tmp_path)
    assert log.finished and not log.warnings and log.planned_rounds == 1
    s = summarise_rounds(log.rounds, log.run)[1]
    assert (s.accuracy, s.asked, s.trained, s.refused, s.failed, s.lost) == (0.4, 2, 1, 0, 1, 0)
    (rpi4,) = s.devices
    assert rpi4.peak_bytes == 500 and rpi4.budget_bytes == 400 and rpi4.peak_ratio == (0.75, 1.0, 1.25)
    assert s.bytes_up == 10 and s.whole_model_bytes == 100 * 3 and s.seconds == 3.0
    assert s.reasons == {("memory-exceeded", "over"): ["rpi4-1"]}
    # and the recorder writes what it wrote then: the same keys, the same text
    recorder = RoundRecorder(tmp_path / "new" / ROUND_LOG)
    old_round = json.loads(OLD_LOG.splitlines()[2])
    recorder.sent(1, 2, 10, 11)
    for client in old_round["clients"]:
        recorder.client(1, client)
    recorder.end_round(1, old_round["global"])
    (written,) = read_rounds(recorder.path)
    assert json.dumps(written | {"time": 3.0, "elapsed": 4.0}) == OLD_LOG.splitlines()[2]  # byte for byte


# -- only the clients evaluate, and the server has no held-out split -------------------------------
CLIENTS_JOB = JOB | {"rounds": 2, "clients-per-round": 2, "evaluation": "clients", "eval-fraction": 0.25,
                     "model": "resnet18", "dataset": "mnist-digits", "examples-per-client": 64, "eval-examples": 48,
                     "lr": 0.01}
CLIENT_DEVICES = ("rpi4", "rpi4")


@pytest.fixture(scope="module")
def clients_run(tmp_path_factory):
    """Two rounds with ``evaluation: clients``, on a server for which any held-out split is missing: the
    job's test split cannot be read in this process (the clients, here in the same process, read only
    their training shares)."""
    from odl_fed.federation import job_assets

    root = tmp_path_factory.mktemp("clients-eval")
    fleet = root / "fleet.yaml"
    job = {k: v for k, v in CLIENTS_JOB.items() if v is not None}
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}], "job": job}))
    out = root / "out"
    config = {"fleet": str(fleet), "out-dir": str(out), "plan-cache": "", "round-timeout": 60}
    grid = LocalGrid(config, devices=CLIENT_DEVICES)
    read = job_assets._dataset

    def no_test_split(name, split):
        if split != "train":
            raise AssertionError(f"the server read the {split} split of {name}")
        return read(name, split)

    patch = pytest.MonkeyPatch()
    patch.setattr(job_assets, "_dataset", no_test_split)
    try:
        console = _serve(grid, config)
    finally:
        patch.undo()
    lines = [json.loads(text) for text in (out / ROUND_LOG).read_text().splitlines()]
    return {"out": out, "lines": lines, "console": console, "sent": grid.sent, "fleet": fleet}


def test_a_run_where_only_the_clients_evaluate_records_their_before_and_after(clients_run):
    lines = clients_run["lines"]
    assert [line[EVENT] for line in lines] == [Event.RUN, Event.ROUND, Event.ROUND, Event.ROUND, Event.END]
    assert lines[0][RunKey.JOB]["evaluation"] == "clients"
    rounds = _by_event(lines, Event.ROUND)
    assert all(r[RoundKey.GLOBAL] == {} for r in rounds)  # the server evaluated nothing
    assert lines[-1][EndKey.FINAL_ACCURACY] is None
    for r in rounds[1:]:
        clients = r[RoundKey.CLIENTS]
        assert [c[ClientKey.STATUS] for c in clients] == [Status.OK, Status.OK]
        assert all(c[Metric.EVAL_EXAMPLES] == 48 and c[Metric.NUM_EXAMPLES] == 64 for c in clients)
        held = sum(c[Metric.EVAL_EXAMPLES] for c in clients)
        evaluation = r[RoundKey.CLIENT_EVAL]
        assert evaluation[ClientEvalKey.EXAMPLES] == held and evaluation[ClientEvalKey.CLIENTS] == 2
        for key, metric in ((ClientEvalKey.ACCURACY_BEFORE, Metric.EVAL_ACC_BEFORE),
                            (ClientEvalKey.ACCURACY_AFTER, Metric.EVAL_ACC_AFTER)):
            assert evaluation[key] == pytest.approx(sum(c[metric] * c[Metric.EVAL_EXAMPLES] for c in clients) / held)
    for r in rounds[1:]:
        evaluation = r[RoundKey.CLIENT_EVAL]
        assert evaluation[ClientEvalKey.GAIN] == pytest.approx(evaluation[ClientEvalKey.ACCURACY_AFTER]
                                                               - evaluation[ClientEvalKey.ACCURACY_BEFORE])
    # from the model round 1 aggregated (a random backbone's head, after 4 steps per client), a round of
    # fine-tuning helps on the clients' own held-out examples (measured: +0.146 on 96)
    assert rounds[2][RoundKey.CLIENT_EVAL][ClientEvalKey.GAIN] > 0.05


def test_before_is_the_global_model_the_client_was_sent_on_its_held_out_examples(clients_run):
    """Each client's ``eval-acc-before`` is the global model it was sent that round, scored here on the
    client's held-out part (the same split every round, disjoint from what it trains on)."""
    import torch

    from odl_fed.config.fleet import load_fleet
    from odl_fed.federation.job_assets import client_data, client_held_out, global_model
    from odl_fed.training.task import evaluate

    job = load_fleet(clients_run["fleet"]).job
    rounds = _by_event(clients_run["lines"], Event.ROUND)
    for partition in range(2):
        held, trained = client_held_out(job, partition, 2), client_data(job, partition, 2)
        assert len(held) == 48 and len(trained) == 64
        pictures = {bytes(image.numpy()) for image in trained.images}
        assert not any(bytes(image.numpy()) in pictures for image in held.images)  # nothing trained on is scored
        for r in rounds[1:]:
            (entry,) = [c for c in r[RoundKey.CLIENTS] if c[ClientKey.CLIENT] == f"rpi4-{partition}"]
            model, _ = global_model(job, num_classes=10)
            model.load_state_dict(clients_run["sent"][(r[RoundKey.ROUND], FIRST_NODE + partition)], strict=False)
            scored = evaluate(model, held, batch_size=entry[ClientKey.PLAN]["batch_size"],
                              image_size=job.image_size, in_eval_mode=True)
            assert entry[Metric.EVAL_ACC_BEFORE] == pytest.approx(scored["accuracy"], abs=1e-9), r[RoundKey.ROUND]
    # round 2 started from what round 1 aggregated: its "before" is not round 1's
    assert rounds[2][RoundKey.CLIENT_EVAL][ClientEvalKey.ACCURACY_BEFORE] != \
        rounds[1][RoundKey.CLIENT_EVAL][ClientEvalKey.ACCURACY_BEFORE]
    assert not torch.equal(*(next(iter(clients_run["sent"][(r, FIRST_NODE)].values())) for r in (1, 2)))


def test_the_views_show_the_clients_evaluation_where_the_server_made_none(clients_run):
    out, rounds = clients_run["out"], _by_event(clients_run["lines"], Event.ROUND)
    summaries = summarise_rounds(rounds, clients_run["lines"][0])
    assert all(not s.server_evaluated for s in summaries)
    text = clients_run["console"].splitlines()
    assert text[1] == "round 0/2 | starting model: not evaluated on the server (the clients evaluate) | " \
                      f"{summaries[0].seconds:.1f} s"
    for line, s in zip(text[2:4], summaries[1:]):
        assert line.startswith(f"round {s.round}/2 | no server evaluation | clients' top-1 {s.client_before:.3f} -> "
                               f"{s.client_after:.3f} ({s.client_gain:+.3f}) on 96 held out [rpi4 ")
        assert client_eval_text(s) in line
    last = summaries[-1]
    assert text[4].startswith(f"done: clients' top-1 {last.client_before:.3f} -> {last.client_after:.3f} "
                              f"({last.client_gain:+.3f}) in the last round, after 2 rounds")
    page = (out / schema.REPORT_FILE).read_text()
    assert "the clients, each on the part of its data it holds out" in page
    assert (f"the clients&#x27; held-out top-1 in round 2: {last.client_before:.3f} before fine-tuning, "
            f"{last.client_after:.3f} after") in page
    assert f'data-value="{last.client_after!r}">{last.client_after:.3f}</td>' in page
    markdown = write_report([out], fmt="md", out=out / "report.md").read_text()
    assert "| 2 | - | - | 2 | 0 | 0 | 0 |" in markdown
    assert f"| {last.client_before:.3f} | {last.client_after:.3f} | {last.client_gain:+.3f} |" in markdown
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / schema.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    assert "global/accuracy" not in events.Tags()["scalars"]
    assert {e.step: e.value for e in events.Scalars("clients-eval/gain")} == pytest.approx(
        {s.round: s.client_gain for s in summaries[1:]})


def test_a_deployed_clients_own_round_lines_show_its_held_out_scores():
    """What ``python -m odl_fed.client`` prints from its ClientApp's round notes."""
    from odl_fed.deploy.supernode import round_line

    note = {"round": 2, ClientKey.STATUS: Status.OK, ClientKey.ERROR: "", Metric.NUM_EXAMPLES: 64,
            Metric.EVAL_ACC_BEFORE: 0.0625, Metric.EVAL_ACC_AFTER: 0.2083, Metric.EVAL_EXAMPLES: 48}
    assert round_line(note).startswith("round 2: ok, 64 examples, ")
    assert round_line(note).endswith(", held-out top-1 0.062 -> 0.208 on 48")
    assert "held-out" not in round_line({k: v for k, v in note.items() if not k.startswith("eval-")})

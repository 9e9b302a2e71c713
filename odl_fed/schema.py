"""Everything that crosses a process or file boundary, by name: the one place its keys are spelled.

The round log (``RUN_DIR/rounds.jsonl``) is the product's contract between processes: clients reply
to the server in Flower records (:class:`ClientInfo`, :class:`ClientMetrics`), the server writes
one JSON line per event (:class:`RunLine`, :class:`RoundLine` with its :class:`ClientEntry` per
client, :class:`ResumeLine`, :class:`EndLine`), and every view (console, TensorBoard, report), the
benchmarks and the tests read it back. Writers and readers use the names here instead of string
literals, so a key cannot be renamed on one side only; ``tests/test_schema.py`` checks that what the
recorder writes is what is declared here, and that every reader sees it.

The values are plain ``str`` (not an ``Enum``), so the JSON written and Flower's records stay byte
for byte what they were: old round logs still read. Keys are kebab-case, except a few of the run
and end lines' (``trained_convs``, ``model_bytes``, ``final_accuracy``), which were written so first.

Pure Python: nothing from odl_fed, no torch, no Flower.
"""

from __future__ import annotations

from typing import Any, Final, TypedDict

__all__ = ["ROUND_LOG", "CHECKPOINT_FILE", "TRAINED_LAYERS_FILE", "REPORT_FILE", "TENSORBOARD_DIR", "DEFAULT_PORT",
           "EVENT", "Event", "RunKey", "JobKey", "RoundKey", "GlobalKey", "ClientEvalKey", "ResumeKey", "EndKey",
           "ClientKey", "Metric", "AttemptKey", "Status", "Outcome", "Record", "ConfigKey", "MethodName",
           "METHOD_NAMES", "RunLine", "RoundLine", "GlobalMetrics", "ClientEvalMetrics", "ResumeLine", "EndLine",
           "ClientEntry", "ClientInfo", "ClientMetrics", "AttemptEntry", "LINE_TYPES", "names", "to_json_value",
           "END_QUERY", "RUN_END_FILE_ENV", "EndNotice", "ROUND_NOTES_FILE_ENV", "JOIN_QUERY", "WEIGHTS_RECORD",
           "TRAIN_MESSAGE", "WEIGHTS_ARRAY", "WEIGHTS_HAVE", "WEIGHTS_ERROR", "WEIGHTS_CACHE_ENV", "WARM_HINT_FILE_ENV",
           "IN_HAND_FILE_ENV", "WarmHint", "LauncherKey"]

# -- files of a run directory, and the SuperLink's port --------------------------------------
ROUND_LOG: Final = "rounds.jsonl"  # the round log (odl_fed.federation.recorder)
CHECKPOINT_FILE: Final = "checkpoint.pt"  # the run's state after its last round (odl_fed.federation.checkpoint)
TRAINED_LAYERS_FILE: Final = "trained_layers.pt"  # the final global trained layers (a torch state dict)
REPORT_FILE: Final = "report.html"  # the run's report (odl_fed.dashboard.report)
TENSORBOARD_DIR: Final = "tensorboard"  # TensorBoard's event files (odl_fed.dashboard.tensorboard_log)
DEFAULT_PORT: Final = 9092  # the SuperLink's port the deployed fleet's entries default to (Flower's Fleet API)


def names(namespace: type) -> tuple[str, ...]:
    """The values a namespace class below holds, in the order it declares them (``ALL`` and friends left out)."""
    return tuple(v for k, v in vars(namespace).items() if k.isupper() and isinstance(v, str))


# -- the round log's events --------------------------------------------------------------------
EVENT: Final = "event"  # every line's key: which event it is


class Event:
    """The values of a line's ``event``, in the order a run writes them."""

    RUN: Final = "run"
    ROUND: Final = "round"
    RESUME: Final = "resume"
    END: Final = "end"


class RunKey:
    """The ``run`` line: the fleet, the job and the server's settings (first line of a run)."""

    TIME: Final = "time"
    FLEET: Final = "fleet"  # the fleet file's path
    JOB: Final = "job"  # the job as the fleet gave it: odl_fed.config.fleet.JobSpec's fields (JobKey)
    CLIENTS: Final = "clients"  # how many clients the fleet has
    DEVICES: Final = "devices"  # device name -> count
    TRAINED_CONVS: Final = "trained_convs"
    TRAINED_BYTES: Final = "trained_bytes"  # what the trained layers weigh (one transfer)
    MODEL_BYTES: Final = "model_bytes"  # what the whole model weighs
    SETTINGS: Final = "settings"  # the run config (odl_fed.config.run)


class JobKey:
    """The job's fields (``JobSpec``, snake_case) that the views show."""

    MODEL: Final = "model"
    METHOD: Final = "method"
    ROUNDS: Final = "rounds"
    EVALUATION: Final = "evaluation"  # who evaluates: server, clients or both (odl_fed.config.names.EVALUATIONS)


class RoundKey:
    """A ``round`` line: one per evaluated round (0: the starting model)."""

    ROUND: Final = "round"
    TIME: Final = "time"
    ELAPSED: Final = "elapsed"  # seconds since the run started (a resumed run leaves its downtime out)
    GLOBAL: Final = "global"  # GlobalKey; empty when the server does not evaluate (evaluation: clients)
    CLIENT_EVAL: Final = "client-eval"  # ClientEvalKey; only in a round where clients evaluated
    CLIENTS_ASKED: Final = "clients-asked"
    BYTES_DOWN: Final = "bytes-down"  # parameter bytes sent to the clients asked
    RECORD_BYTES_DOWN: Final = "record-bytes-down"  # the same with Flower's headers
    BYTES_UP: Final = "bytes-up"  # parameter bytes received from the clients aggregated
    RECORD_BYTES_UP: Final = "record-bytes-up"
    AGGREGATED: Final = "aggregated"  # clients whose update was aggregated (status ok)
    FAILED: Final = "failed"  # clients asked that were not
    CLIENTS: Final = "clients"  # one ClientEntry per client, sorted by name
    SKIPPED: Final = "skipped"  # only in a round that asked no one: why


class GlobalKey:
    """A round's ``global``: the global model on the held-out split."""

    ACCURACY: Final = "accuracy"
    LOSS: Final = "loss"
    EXAMPLES: Final = "examples"
    EVAL_TIME: Final = "eval-time"


class ClientEvalKey:
    """A round's ``client-eval``: the clients' evaluations of the round, weighted by their held-out examples.

    ``accuracy-before`` is the global model the round started from, on the clients' held-out parts;
    ``accuracy-after`` each client's model after its local fine-tuning, on its own held-out part.
    """

    ACCURACY_BEFORE: Final = "accuracy-before"
    ACCURACY_AFTER: Final = "accuracy-after"
    GAIN: Final = "gain"  # after - before
    EXAMPLES: Final = "examples"  # held-out examples, summed over the clients
    CLIENTS: Final = "clients"  # how many clients evaluated


class ResumeKey:
    """A ``resume`` line: the server went on from its checkpoint after round ``from-round``."""

    TIME: Final = "time"
    FROM_ROUND: Final = "from-round"


class EndKey:
    """The ``end`` line."""

    TIME: Final = "time"
    ELAPSED: Final = "elapsed"
    FINAL_ACCURACY: Final = "final_accuracy"
    ROUNDS: Final = "rounds"


class ClientKey:
    """A client's entry in a round line, as the server records it (its reply's metrics beside these)."""

    CLIENT: Final = "client"  # the client's name: DEVICE-PARTITION, or node-ID before it answered
    NODE: Final = "node"  # Flower's node id
    DEVICE: Final = "device"
    STATUS: Final = "status"  # Status
    BYTES_DOWN: Final = "bytes-down"
    BYTES_UP: Final = "bytes-up"  # aggregated clients only
    RECORD_BYTES_UP: Final = "record-bytes-up"
    PLAN: Final = "plan"  # the plan it trained with (odl_fed.planning.device_plan.ClientPlan.to_dict), or null
    ATTEMPT_LOG: Final = "attempt-log"  # a list of AttemptEntry
    REASON: Final = "reason"  # why it was not aggregated
    ERROR: Final = "error"  # in the reply's ClientInfo only: what the server records as ``reason``


class Metric:
    """The client's metrics (Flower's MetricRecord ``metrics``), recorded in its entry as they came.

    A client that trained sends them all; a refused one only ``train-memory`` and ``server-round``;
    one that broke its budget also ``peak-memory``, ``memory-budget`` and ``attempts``.
    """

    TRAIN_MEMORY: Final = "train-memory"  # the device's training memory (its profile)
    SERVER_ROUND: Final = "server-round"
    NUM_EXAMPLES: Final = "num-examples"  # what aggregation weighs the update by
    TRAIN_LOSS: Final = "train-loss"
    TRAIN_TIME: Final = "train-time"
    BATCH_SIZE: Final = "batch-size"
    LAYERS_TRAINED: Final = "layers-trained"
    EXACT_LAYERS: Final = "exact-layers"
    ACTIVATION_BYTES: Final = "activation-bytes"  # measured, saved for backward (saved_tensors_hooks)
    PLANNED_ACTIVATION_BYTES: Final = "planned-activation-bytes"
    STEP_SAVED_BYTES: Final = "step-saved-bytes"
    PEAK_MEMORY: Final = "peak-memory"  # the memory guard's peak (psutil), bytes
    MEMORY_BUDGET: Final = "memory-budget"  # the guard's budget, bytes
    PLANNED_NEED: Final = "planned-need"
    GUARD_SAMPLES: Final = "guard-samples"
    GUARD_RECLAIMS: Final = "guard-reclaims"
    WARM_BASES: Final = "warm-bases"
    FLOPS_PER_STEP: Final = "flops-per-step"
    TRAIN_FLOPS: Final = "train-flops"
    PLAN_TIME: Final = "plan-time"
    PLAN_CACHED: Final = "plan-cached"
    ATTEMPTS: Final = "attempts"  # how many plans the round tried
    CLIENT_TIME: Final = "client-time"
    # federated evaluation (a client that trained, when the job's evaluation is clients or both): top-1 on
    # the part of its data it holds out, of the global model before its local fine-tuning and after it
    EVAL_ACC_BEFORE: Final = "eval-acc-before"
    EVAL_ACC_AFTER: Final = "eval-acc-after"
    EVAL_EXAMPLES: Final = "eval-examples"
    EVAL_TIME: Final = "eval-time"  # seconds of both evaluations (not in train-time)


class AttemptKey:
    """One entry of a client's ``attempt-log``: a plan it tried this round and what became of it."""

    STATUS: Final = "status"  # Status.OK or Status.MEMORY_EXCEEDED
    LAYERS: Final = "layers"
    BATCH_SIZE: Final = "batch-size"
    ACTIVATION_SCALE: Final = "activation-scale"
    PEAK_MEMORY: Final = "peak-memory"
    MEMORY_BUDGET: Final = "memory-budget"
    PLANNED_NEED: Final = "planned-need"
    ERROR: Final = "error"


class Status:
    """A client's ``status`` in a round: what the client says (ok, refused, memory-exceeded), or the server."""

    OK: Final = "ok"  # trained; its update was aggregated
    REFUSED: Final = "refused"  # it did not train: no setting fits its budget, or its own images cannot train
    MEMORY_EXCEEDED: Final = "memory-exceeded"  # it broke its memory budget and could not retreat in time
    REJECTED: Final = "rejected"  # the server rejected its reply (odl_fed.federation.validation)
    ERROR: Final = "error"  # an error reply (the ClientApp failed, or the node was lost to the SuperLink)
    LOST: Final = "lost"  # no reply by the round's timeout
    # what the views count as ``failed``: it was asked, answered, and did not count
    FAILED: Final = (MEMORY_EXCEEDED, REJECTED, ERROR)


class Outcome:
    """How the views group a round's clients (``odl_fed.dashboard.round_summary``): trained is ``ok``."""

    TRAINED: Final = "trained"
    REFUSED: Final = "refused"
    FAILED: Final = "failed"
    LOST: Final = "lost"


class Record:
    """The records of Flower's messages between ServerApp and ClientApp (RecordDict keys)."""

    CONFIG: Final = "config"  # server -> client: ConfigKey
    ARRAYS: Final = "arrays"  # both ways: the trained layers
    CLIENT: Final = "client"  # client -> server: ClientInfo (a ConfigRecord)
    METRICS: Final = "metrics"  # client -> server: ClientMetrics (a MetricRecord)


class ConfigKey:
    """The server's train instruction (its ConfigRecord ``config``; Flower's strategies fill it)."""

    SERVER_ROUND: Final = "server-round"
    PROXIMAL_MU: Final = "proximal-mu"  # FedProx
    # The job travels with every instruction, so a board needs no copy of the fleet file:
    JOB: Final = "job"  # the fleet's job mapping, as JSON (odl_fed.config.job.job_mapping)
    NUM_CLIENTS: Final = "num-clients"  # the fleet's clients: a node config without num-partitions
    WEIGHTS_SHA256: Final = "weights-sha256"  # the backbone's file, when the job names one
    WEIGHTS_PATH: Final = "weights-path"  # where the job's backbone file is on the server (query.join)


# -- a node joins the run ------------------------------------------------------------------------
# Before a node's first round the server greets it (Flower's ``query`` with the action ``join``;
# ConfigRecord ``config`` with ConfigKey.WEIGHTS_SHA256 and WEIGHTS_PATH when the job has a backbone file).
# The node answers in its ConfigRecord ``config`` who it is (ClientKey.CLIENT, ClientKey.DEVICE: a node
# whose ClientApp later dies is still named) and whether it holds the backbone (WEIGHTS_HAVE). One that
# does not gets a second such message with the file's bytes as one uint8 array (WEIGHTS_ARRAY) in the
# ArrayRecord ``weights``; it checks their hash and keeps them in its cache (odl_fed.federation.backbone),
# answering WEIGHTS_HAVE again, or WEIGHTS_ERROR.
JOIN_QUERY: Final = "query.join"
TRAIN_MESSAGE: Final = "train"  # Flower's message type of a round's training (flwr.common.MessageType.TRAIN)
WEIGHTS_RECORD: Final = "weights"
WEIGHTS_ARRAY: Final = "file"
WEIGHTS_HAVE: Final = "have"
WEIGHTS_ERROR: Final = "error"
WEIGHTS_CACHE_ENV: Final = "ODL_FED_CACHE_DIR"  # a board's cache (default ~/.cache/odl-fed)


# -- the end of a run, told to every node --------------------------------------------------------
# When the job is done the server sends each node one message of this type (Flower's ``query`` with
# the action ``end``); its ConfigRecord ``config`` holds EndNotice's keys. The ClientApp writes them to
# the file the client entry named in RUN_END_FILE_ENV, so the entry can tell a finished run from a lost
# SuperLink and exit 0 (odl_fed.deploy.supernode).
END_QUERY: Final = "query.end"
RUN_END_FILE_ENV: Final = "ODL_FED_RUN_END_FILE"
# Each round the ClientApp appends its outcome (ClientKey.STATUS, ClientKey.ERROR and Metric keys, plus
# "round") as one JSON line to the file the client entry named here; the entry prints one plain line.
ROUND_NOTES_FILE_ENV: Final = "ODL_FED_ROUND_NOTES_FILE"
# A train message's ClientApp writes its run config and node config (WarmHint's keys, one JSON object) to
# the file the warm launcher named here, so the launcher builds that job's model and data once, for the
# node's later messages (odl_fed.deploy.launcher).
WARM_HINT_FILE_ENV: Final = "ODL_FED_WARM_HINT_FILE"
# A ClientApp forked by the warm launcher notes the message in its hands (a pickle: the message without its
# content, the context, and once known the client and device) in the file named here; when the process
# dies by a signal (an illegal instruction, the kernel's OOM kill), the launcher answers that message with
# an error naming the client, its device and the signal, so the round log says what happened.
IN_HAND_FILE_ENV: Final = "ODL_FED_IN_HAND_FILE"


class WarmHint:
    RUN_CONFIG: Final = "run-config"
    NODE_CONFIG: Final = "node-config"
    INSTRUCTION: Final = "instruction"  # the train message's ConfigRecord (the job, ConfigKey)


class LauncherKey:
    """The warm launcher's record (``launcher.jsonl`` in its state directory), one JSON line per event:
    ``start`` (its imports), ``warm`` (its builds), ``child`` (one message's process), ``exit``."""

    EVENT: Final = "event"
    PID: Final = "pid"
    TIME: Final = "time"
    IMPORTS_S: Final = "imports-s"  # start: seconds importing torch, flwr and odl_fed
    START_S: Final = "start-s"  # start: seconds from the interpreter's start to ready
    MODULES: Final = "modules"  # start: modules in sys.modules once ready
    MODEL_S: Final = "model-s"  # warm: seconds building the job's model
    DATA_S: Final = "data-s"  # warm: seconds loading and decoding the client's share
    RSS: Final = "rss"  # start / warm: the launcher's resident bytes
    TASK_ID: Final = "task-id"  # child: Flower's task
    MESSAGE_TYPE: Final = "message-type"  # child: the message it handled ("train", "query.join", "query.end")
    LAUNCH_S: Final = "launch-s"  # child: seconds from the fork to the ClientApp's start
    RUN_S: Final = "run-s"  # child: seconds of Flower's ClientApp process body (pull, handle, reply)
    MODULES_IMPORTED: Final = "modules-imported"  # child: modules it imported itself
    TORCH_IMPORTED: Final = "torch-imported"  # child: whether torch was among them
    BUILDS: Final = "builds"  # child: {"model": n, "data": n, ...} it built itself
    SPAWNED: Final = "spawned"  # child: the processes it started itself ("subprocess.Popen uname", ...)
    STATUS: Final = "status"  # child / exit: its exit status


class EndNotice:
    ROUNDS: Final = "rounds"
    ACCURACY: Final = "final-accuracy"  # absent when the server did not evaluate


class MethodName:
    """The fine-tuning methods (odl_fed.training.methods.METHODS holds exactly these, in this order)."""

    VANILLA: Final = "vanilla"
    ASI: Final = "asi"
    ASI_ONLY: Final = "asi-only"
    HOSVD: Final = "hosvd"
    GRADFILT: Final = "gradfilt"
    ASI_FP16: Final = "asi-fp16"
    ASI_INT8: Final = "asi-int8"


METHOD_NAMES: Final = names(MethodName)

# -- the lines and records, typed (kebab-case keys, hence the functional syntax) ----------------
RunLine = TypedDict("RunLine", {
    "event": str, "time": float, "fleet": str, "job": dict[str, Any], "clients": int, "devices": dict[str, int],
    "trained_convs": list[str], "trained_bytes": int, "model_bytes": int, "settings": dict[str, Any]}, total=False)

GlobalMetrics = TypedDict("GlobalMetrics", {"accuracy": float, "loss": float, "examples": int, "eval-time": float},
                          total=False)

ClientMetrics = TypedDict("ClientMetrics", {
    "train-memory": int, "server-round": int, "num-examples": int, "train-loss": float, "train-time": float,
    "batch-size": int, "layers-trained": int, "exact-layers": int, "activation-bytes": int,
    "planned-activation-bytes": int, "step-saved-bytes": int, "peak-memory": int, "memory-budget": int,
    "planned-need": int, "guard-samples": int, "guard-reclaims": int, "warm-bases": int, "flops-per-step": int,
    "train-flops": int, "plan-time": float, "plan-cached": int, "attempts": int, "client-time": float,
    "eval-acc-before": float, "eval-acc-after": float, "eval-examples": int, "eval-time": float},
    total=False)

ClientEvalMetrics = TypedDict("ClientEvalMetrics", {"accuracy-before": float, "accuracy-after": float,
                                                    "gain": float, "examples": int, "clients": int})

AttemptEntry = TypedDict("AttemptEntry", {
    "status": str, "layers": int, "batch-size": int, "activation-scale": float, "peak-memory": int,
    "memory-budget": int, "planned-need": int, "error": str})

# The client's ConfigRecord ``client`` (plan and attempt-log as JSON text there).
ClientInfo = TypedDict("ClientInfo", {"client": str, "device": str, "status": str, "error": str, "plan": str,
                                      "attempt-log": str})

# A client's entry in a round line: these keys, and its ClientMetrics as it sent them.
ClientEntry = TypedDict("ClientEntry", {
    "client": str, "node": int, "device": str | None, "status": str, "bytes-down": int, "bytes-up": int,
    "record-bytes-up": int, "plan": dict[str, Any] | None, "attempt-log": list[AttemptEntry] | None,
    "reason": str}, total=False)

RoundLine = TypedDict("RoundLine", {
    "event": str, "round": int, "time": float, "elapsed": float, "global": GlobalMetrics, "clients-asked": int,
    "bytes-down": int, "record-bytes-down": int, "bytes-up": int, "record-bytes-up": int, "aggregated": int,
    "failed": int, "clients": list[ClientEntry], "skipped": str, "client-eval": ClientEvalMetrics}, total=False)

ResumeLine = TypedDict("ResumeLine", {"event": str, "time": float, "from-round": int})

# final_accuracy: null when the server did not evaluate (evaluation: clients)
EndLine = TypedDict("EndLine", {"event": str, "time": float, "elapsed": float, "final_accuracy": float | None,
                                "rounds": int}, total=False)

# each event's line, and the key namespace its keys are named by (the event key aside)
LINE_TYPES: Final = {Event.RUN: (RunLine, RunKey), Event.ROUND: (RoundLine, RoundKey),
                     Event.RESUME: (ResumeLine, ResumeKey), Event.END: (EndLine, EndKey)}


def to_json_value(value):
    """What ``json.dumps(..., default=to_json_value)`` writes for a value JSON has no type for: a NumPy or
    torch scalar as its number, a set or tuple as a list, anything else as its ``str``."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)

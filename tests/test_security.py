"""TLS and SuperNode authentication: `odl-fed certs`, the files' checks, and on loopback with a real
SuperLink and real SuperNodes: a registered node trains, an unregistered one is refused and trains
nothing, a node given another CA cannot connect, an expired certificate is one clear error.

Every process a test starts is stopped by its PID, and the test checks from outside (psutil) that
none of them, nor anything they started, is left.
"""

import datetime as dt
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from odl_fed.cli import main as cli_main
from odl_fed.deploy import superlink as server
from odl_fed.deploy import supernode as client
from odl_fed.deploy.certs import check_certificate, check_node_key, make_certs, server_certs
from odl_fed.deploy.processes import flower_command, free_port, wait_for_port
from odl_fed.federation.recorder import read_rounds
from processes import ROOT, env, start, stop_all, tree

JOB = {"model": "mobilenet_v2", "layers": 1, "method": "asi", "rounds": 1, "clients-per-round": 1,
       "local-epochs": 1, "batch-size": 16, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits",
       "partition": "iid", "seed": 0, "examples-per-client": 32, "eval-examples": 100}
NOW = dt.datetime.now(dt.timezone.utc)


def _entry(args: list[str], log: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", *args], log)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


def _reissue_server(directory: Path, *, not_after: dt.datetime) -> None:
    """Sign ``directory``'s server key again with its CA, valid until ``not_after`` (an expired one)."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    old = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject).public_key(old.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_after - dt.timedelta(days=2))
            .not_valid_after(not_after)
            .add_extension(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
            .sign(ca_key, hashes.SHA384()))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture()
def certs(tmp_path) -> Path:
    directory = tmp_path / "certs"
    make_certs(directory, nodes=["0"], hosts=["server"])
    return directory


# --- the files -------------------------------------------------------------------------------------------------------

def test_certs_writes_a_chain_and_node_keys_flower_reads(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert cli_main(["certs", str(directory), "--nodes", "2", "--node", "laptop", "--host", "server",
                     "--days", "3"]) == 0
    printed = capsys.readouterr().out
    assert "--certs" in printed and "--root-certificates" in printed and "--auth-key" in printed
    checked = server_certs(directory, host="server")
    assert [p.name for p in checked.node_keys] == ["node-0.pub", "node-1.pub", "node-laptop.pub"]
    cert = check_certificate(directory / "server.crt", ca_path=directory / "ca.crt", host="127.0.0.1")
    assert dt.timedelta(days=2.9) < cert.not_valid_after_utc - NOW < dt.timedelta(days=3.1)
    for name in ("0", "1", "laptop"):
        check_node_key(directory / f"node-{name}.key")
        assert (directory / f"node-{name}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    for secret in ("ca.key", "server.key", "node-0.key"):
        assert stat.S_IMODE((directory / secret).stat().st_mode) == 0o600

    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert cli_main(["certs", str(directory), "--nodes", "1"]) == 2  # nothing overwritten without --force
    assert "not overwriting keys" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert cli_main(["certs", str(directory), "--nodes", "1", "--force"]) == 0
    assert (directory / "ca.crt").read_bytes() != before["ca.crt"]


def _expired_ca(directory: Path) -> None:
    make_certs(directory, nodes=["0"], days=1, force=True, now=NOW - dt.timedelta(days=3))


def _expired_server(directory: Path) -> None:
    _reissue_server(directory, not_after=NOW - dt.timedelta(hours=1))


def _foreign_ca(directory: Path) -> None:
    make_certs(directory.parent / "other", nodes=[])
    (directory / "ca.crt").write_bytes((directory.parent / "other" / "ca.crt").read_bytes())


def _foreign_key(directory: Path) -> None:
    make_certs(directory.parent / "other", nodes=[])
    (directory / "server.key").write_bytes((directory.parent / "other" / "server.key").read_bytes())


def _no_node_keys(directory: Path) -> None:
    (directory / "node-0.pub").unlink()


@pytest.mark.parametrize("spoil, names, says", [
    (_expired_ca, "ca.crt", "expired on"),
    (_expired_server, "server.crt", "expired on"),
    (_foreign_ca, "server.crt", "was not signed by the CA"),
    (_foreign_key, "server.key", "does not belong to the server certificate"),
    (_no_node_keys, "certs", "holds no node public key"),
])
def test_server_with_a_bad_certificate_is_one_error_naming_it_and_loses_nothing(certs, tmp_path, capsys, spoil,
                                                                                names, says):
    spoil(certs)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 1}], "job": JOB}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "rounds.jsonl").write_text('{"event": "end"}\n')  # an earlier run's log
    children = psutil.Process().children(recursive=True)
    assert server.main(["--fleet", str(fleet), "--out-dir", str(out), "--certs", str(certs),
                        "--listen", f"127.0.0.1:{free_port()}"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and says in lines[0] and str(certs / names if names != "certs" else certs) in lines[0]
    assert (out / "rounds.jsonl").read_text() == '{"event": "end"}\n' and sorted(os.listdir(out)) == ["rounds.jsonl"]
    assert psutil.Process().children(recursive=True) == children  # nothing started


def test_server_needs_a_key_per_client(certs, tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}], "job": JOB}))
    assert server.main(["--fleet", str(fleet), "--out-dir", str(tmp_path / "out"), "--certs", str(certs)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "holds 1 node public key(s) but the fleet" in line and "2 clients" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    ([], "give --root-certificates CA and --auth-key KEY"),
    (["--insecure", "--auth-key", "k"], "--insecure cannot go with"),
])
def test_client_needs_tls_or_an_explicit_insecure(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main(["--device", "rpi4", "--superlink", "127.0.0.1:9", *argv])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_server_needs_certs_or_an_explicit_insecure(capsys):
    with pytest.raises(SystemExit) as exit_:
        server.main(["--fleet", "configs/fleets/demo.yaml"])
    assert exit_.value.code == 2 and "one of the arguments --certs --insecure is required" in capsys.readouterr().err


@pytest.mark.parametrize("files, says", [
    (lambda d: (d / "old" / "ca.crt", d / "certs" / "node-0.key"), "the CA certificate {} expired on"),
    (lambda d: (d / "certs" / "server.crt", d / "certs" / "node-0.key"), "the CA certificate {} is not a CA"),
    (lambda d: (d / "certs" / "ca.crt", d / "certs" / "node-0.pub"), "the node key {} is not an unencrypted OpenSSH"),
])
def test_client_with_a_bad_file_is_one_error_naming_it(certs, tmp_path, capsys, files, says):
    _expired_ca(tmp_path / "old")
    ca, key = files(tmp_path)
    code = client.main(["--device", "rpi4", "--superlink", "127.0.0.1:9", "--root-certificates", str(ca),
                        "--auth-key", str(key)])
    lines = _error_lines(capsys.readouterr().err)
    bad = ca if "node key" not in says else key
    assert code == 2 and len(lines) == 1 and says.format(bad) in lines[0], lines


# --- on loopback ----------------------------------------------------------------------------------------------------

@pytest.mark.slow  # minutes of real processes: make test-slow (its own CI stage)
def test_registered_node_trains_unregistered_and_foreign_ones_are_refused(certs, tmp_path):
    """One TLS SuperLink with node authentication (the server entry), four nodes at once: the
    registered one trains; a node with an unregistered key is refused and trains nothing; a client
    given another CA stops at the handshake with one error; a bare SuperNode given that CA cannot
    connect either (Flower's own check)."""
    make_certs(tmp_path / "stranger", nodes=["stranger"])  # a key the server does not know
    make_certs(tmp_path / "other", nodes=[])               # another CA
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 1}], "job": JOB}))
    port, out = free_port(), tmp_path / "out"
    link = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    pids: set[int] = set()

    def node(name: str, ca: Path, key: Path, device: str, timeout: str) -> subprocess.Popen:
        process = _entry(["odl_fed.client", "--device", device, "--superlink", link, "--root-certificates", str(ca),
                          "--auth-key", str(key), "--connect-timeout", timeout, "--reconnect-timeout", "5"],
                         tmp_path / f"{name}.log")
        started.append(process)
        return process

    try:
        began = time.monotonic()
        srv = _entry(["odl_fed.server", "--fleet", str(fleet), "--out-dir", str(out), "--listen", link,
                      "--certs", str(certs), "--plan-cache", str(tmp_path / "plans")], tmp_path / "server.log")
        started.append(srv)
        node("registered", certs / "ca.crt", certs / "node-0.key", "rpi4", "300")  # may come before the server
        assert wait_for_port("127.0.0.1", port, timeout=300, process=srv)
        stranger = node("stranger", certs / "ca.crt", tmp_path / "stranger" / "node-stranger.key", "phone", "15")
        foreign = node("foreign", tmp_path / "other" / "ca.crt", certs / "node-0.key", "phone", "60")
        bare = start([flower_command("flower-supernode"), "--root-certificates", str(tmp_path / "other" / "ca.crt"),
                       "--auth-supernode-private-key", str(certs / "node-0.key"), "--superlink", link,
                       "--port", str(free_port()), "--max-wait-time", "10"], tmp_path / "bare.log")
        started.append(bare)
        deadline = time.monotonic() + 600
        while srv.poll() is None and time.monotonic() < deadline:
            for process in started:
                pids |= tree(process)
            time.sleep(0.5)
        log = (tmp_path / "server.log").read_text()
        assert srv.returncode == 0, log[-4000:]
        assert "1 node key(s) registered" in log
        print(f"\nTLS fleet of one node, one round: {time.monotonic() - began:.0f} s")

        rounds = read_rounds(out / "rounds.jsonl")
        assert [r["round"] for r in rounds] == [0, 1]
        (entry,) = rounds[1]["clients"]  # the registered node trained; nobody else
        assert entry["client"] == "rpi4-0" and entry["status"] == "ok", entry

        stranger.wait(timeout=60)
        text = (tmp_path / "stranger.log").read_text()
        assert stranger.returncode == 1, text[-3000:]
        (line,) = _error_lines(text)
        assert f"the SuperLink at {link} refused this node: its key {tmp_path / 'stranger' / 'node-stranger.key'} " \
               f"is not registered there" in line
        assert "phone" not in (out / "rounds.jsonl").read_text()

        foreign.wait(timeout=60)
        text = (tmp_path / "foreign.log").read_text()
        assert foreign.returncode == 2, text[-3000:]
        (line,) = _error_lines(text)
        assert f"its certificate does not verify against {tmp_path / 'other' / 'ca.crt'}: unable to get local " \
               f"issuer certificate" in line
        assert "SuperNode" not in text  # it stopped before starting one

        bare.wait(timeout=60)
        assert bare.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "bare.log").read_text()
        assert "TLS" in (tmp_path / "registered.log").read_text()  # (it ends on its own: test_deploy checks that)
    finally:
        stop_all(started, pids)
    assert not any(link in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


@pytest.mark.process  # a SuperLink, a SuperNode and the client entry
def test_an_expired_server_certificate_stops_the_node_with_one_clear_error(certs, tmp_path):
    """A SuperLink started (by hand, past the server entry's check) with an expired certificate: the
    client entry says so and starts no SuperNode; a bare SuperNode (Flower's check) does not connect.
    A client that asks for plaintext there is told the SuperLink speaks TLS."""
    _expired_server(certs)
    port = free_port()
    link = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    pids: set[int] = set()
    try:
        superlink = start([flower_command("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                            "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
                            "--enable-supernode-auth", "--host", "127.0.0.1",
                            "--database", str(tmp_path / "superlink.db"),
                            "--port", str(port), "--disable-runtime-dependency-installation"],
                           tmp_path / "superlink.log")
        started.append(superlink)
        assert wait_for_port("127.0.0.1", port, timeout=60, process=superlink)
        bare = start([flower_command("flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
                       "--auth-supernode-private-key", str(certs / "node-0.key"), "--superlink", link,
                       "--port", str(free_port()), "--max-wait-time", "10"], tmp_path / "bare.log")
        started.append(bare)
        before = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "odl_fed.client", "--device", "rpi4", "--superlink", link,
                               "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(certs / "node-0.key"),
                               "--connect-timeout", "10"], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        (line,) = _error_lines(done.stderr)
        assert f"the SuperLink at {link}: its certificate does not verify against {certs / 'ca.crt'}: " \
               f"certificate has expired" in line
        assert "SuperNode" not in done.stderr and time.monotonic() - before < 30
        plain = subprocess.run([sys.executable, "-m", "odl_fed.client", "--device", "rpi4", "--superlink", link,
                                "--insecure", "--connect-timeout", "10"], cwd=ROOT, env=env(), capture_output=True,
                               text=True, timeout=60)
        assert plain.returncode == 2 and f"the SuperLink at {link} speaks TLS: give --root-certificates" in \
            _error_lines(plain.stderr)[0], plain.stderr
        bare.wait(timeout=60)
        pids |= tree(superlink)
        text = (tmp_path / "bare.log").read_text()
        assert bare.returncode != 0 and "certificate has expired" in text, text[-2000:]
        assert superlink.poll() is None  # the SuperLink itself is unharmed
    finally:
        stop_all(started, pids)

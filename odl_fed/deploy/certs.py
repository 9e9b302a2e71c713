"""Throwaway certificates for a dev fleet, and the checks that run before anything starts.

``odl-fed certs DIR --nodes 3 --host server`` writes, in ``DIR``:

- ``ca.crt`` / ``ca.key``: a self-signed CA (keep ``ca.key`` off the boards);
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1``, ``::1`` and every ``--host`` (e.g. ``server`` in a compose file);
- ``node-<name>.key`` / ``node-<name>.pub``: one SuperNode's authentication keypair (ECDSA P-384,
  OpenSSH format, what ``ssh-keygen -t ecdsa -b 384`` writes and Flower reads); the server
  registers every ``.pub`` with ``flwr supernode register``, the client keeps its ``.key``.

TLS (the SuperLink's certificate, checked against ``ca.crt``) encrypts the link and proves the
server to the nodes; node authentication (a registered public key) proves each node to the server.
Both are Flower's own mechanisms; this module only makes the files and checks them, so a wrong,
mismatched or expired file is one error naming it, before any process starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertError", "ServerCerts", "make_certs", "node_names", "server_certs", "check_certificate",
           "check_ca", "check_node_key", "check_node_public_key", "make_split_certs", "DEFAULT_DAYS",
           "DEFAULT_HOSTS"]

DEFAULT_DAYS = 30
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
_CURVE = ec.SECP384R1


class CertError(ValueError):
    """A certificate or key that is missing, unreadable, expired, mismatched or from another CA;
    the message names the file."""


@dataclass(frozen=True)
class ServerCerts:
    """What the server entry needs from a certificates directory."""

    ca: Path
    cert: Path
    key: Path
    node_keys: tuple[Path, ...]  # the nodes' public keys to register


def node_names(nodes: int | None = None, names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``--nodes 3`` -> ``["0", "1", "2"]`` (a compose fleet's partition ids); ``--node NAME`` adds names."""
    if nodes is not None and nodes < 0:
        raise CertError(f"--nodes must be 0 or more, but got {nodes}")
    result = [str(i) for i in range(nodes or 0)] + list(names)
    for name in result:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise CertError(f"a node name must be letters, digits, '-', '_' or '.', but got {name!r}")
    if len(set(result)) != len(result):
        raise CertError(f"node names must differ, but got {result}")
    return result


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "odl-fed dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts) -> x509.SubjectAlternativeName:
    entries = []
    for host in dict.fromkeys(hosts):  # ordered, no repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _clear_stand_ins(directories: list[Path], *, force: bool) -> None:
    """Directories where certificate files belong: what Docker leaves when a bind-mounted file is missing.
    With ``force`` an empty one is removed (the file is written in its place); anything else is one error
    naming the path."""
    for path in directories:
        empty = not any(path.iterdir())
        if force and empty:
            path.rmdir()
            continue
        how = (f"remove it (rmdir {path}) or run again with --force" if empty else
               "it is not empty, so it is left alone: move it away and run again")
        raise CertError(f"{path} is a directory where the file {path.name} belongs (Docker makes one where a "
                        f"bind-mounted file is missing): {how}")


def make_certs(directory: Path, *, nodes: list[str], hosts: tuple[str, ...] | list[str] = (),
               days: int = DEFAULT_DAYS, force: bool = False,
               now: dt.datetime | None = None) -> list[Path]:
    """Write a CA, a server certificate for ``DEFAULT_HOSTS + hosts`` and one keypair per node name
    in ``directory``; returns the files written. Existing files are kept (an error names them)
    unless ``force``. ``now`` backdates or postdates the validity (tests make expired files so)."""
    if days < 1:
        raise CertError(f"--days must be at least 1, but got {days}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CertError(f"{directory} is a file, not a directory: give odl-fed certs a directory to write in")
    files = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] + [f"node-{n}.{e}" for n in nodes for e in ("key", "pub")]
    _clear_stand_ins([directory / f for f in files if (directory / f).is_dir()], force=force)
    existing = [f for f in files if (directory / f).exists()]
    if existing and not force:
        raise CertError(f"{directory} already holds {', '.join(existing)}: not overwriting keys "
                        f"(--force replaces them; every node then needs its new key)")
    directory.mkdir(parents=True, exist_ok=True)
    start = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(minutes=5)  # small clock skew
    end = start + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("odl-fed dev CA")).issuer_name(_name("odl-fed dev CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(_CURVE())
    server_cert = (x509.CertificateBuilder().subject_name(_name("odl-fed SuperLink")).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(_san([*DEFAULT_HOSTS, *hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    written = []
    for name, data, private in ((CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), False),
                                (CA_KEY, _pem_key(ca_key), True),
                                (SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), False),
                                (SERVER_KEY, _pem_key(server_key), True)):
        _write(directory / name, data, private=private)
        written.append(directory / name)
    for node in nodes:
        key = ec.generate_private_key(_CURVE())
        _write(directory / f"node-{node}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True)
        _write(directory / f"node-{node}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" odl-fed-node-{node}\n".encode(),
            private=False)
        written += [directory / f"node-{node}.key", directory / f"node-{node}.pub"]
    return written


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertError(f"{what} {path} cannot be read ({error.strerror or error})") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CertError(f"{what} {path} is not a PEM certificate") from None


def _check_dates(cert: x509.Certificate, path: Path, what: str, now: dt.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise CertError(f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: make new ones "
                        f"(odl-fed certs DIR --force)")
    if cert.not_valid_before_utc > now:
        raise CertError(f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                        f"(is this machine's clock right?)")


def check_ca(path: Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """The CA certificate at ``path``, if it is one and valid now; else :class:`CertError`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cert = _load_cert(path, "the CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"the CA certificate {path} is not a CA certificate (give ca.crt, not server.crt)")
    _check_dates(cert, path, "the CA certificate", now)
    return cert


def check_certificate(cert_path: Path, *, ca_path: Path, key_path: Path | None = None, host: str | None = None,
                      now: dt.datetime | None = None) -> x509.Certificate:
    """Check that ``cert_path`` is valid now, signed by the CA at ``ca_path``, matches the private
    key at ``key_path`` and names ``host``; the first problem raises :class:`CertError` naming the file."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ca = check_ca(ca_path, now=now)
    cert = _load_cert(cert_path, "the server certificate")
    _check_dates(cert, cert_path, "the server certificate", now)
    try:
        if cert.issuer != ca.subject:
            raise InvalidSignature
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise CertError(f"the server certificate {cert_path} was not signed by the CA {ca_path} (files from two "
                        f"different `odl-fed certs` runs?)") from None
    if key_path is not None:
        try:
            key = serialization.load_pem_private_key(_read(key_path, "the server key"), password=None)
        except (ValueError, TypeError):
            raise CertError(f"the server key {key_path} is not an unencrypted PEM private key") from None
        if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
                != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CertError(f"the server key {key_path} does not belong to the server certificate {cert_path}")
    if host is not None:
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            known = [*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))]
        except x509.ExtensionNotFound:
            known = []
        if host not in known and host not in ("0.0.0.0", "::"):
            raise CertError(f"the server certificate {cert_path} is not valid for {host!r} (it names "
                            f"{', '.join(known) or 'no host'}; odl-fed certs DIR --host {host})")
    return cert


def _nist_ec(key, path: Path, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or \
            key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise CertError(f"{what} {path} is not an ECDSA key on a NIST curve (Flower needs one: "
                        f"odl-fed certs, or ssh-keygen -t ecdsa -b 384)")


def check_node_key(path: Path) -> None:
    """A SuperNode's private key: OpenSSH format, ECDSA on a NIST curve (what Flower accepts)."""
    try:
        key = serialization.load_ssh_private_key(_read(path, "the node key"), password=None)
    except (ValueError, TypeError):
        raise CertError(f"the node key {path} is not an unencrypted OpenSSH private key (the node-*.key "
                        f"file of odl-fed certs, not the .pub)") from None
    _nist_ec(key, path, "the node key")


def check_node_public_key(path: Path) -> None:
    """A SuperNode's public key, as ``flwr supernode register`` reads it."""
    try:
        key = serialization.load_ssh_public_key(_read(path, "the node public key"))
    except (ValueError, TypeError):
        raise CertError(f"the node public key {path} is not an OpenSSH public key") from None
    _nist_ec(key, path, "the node public key")


def server_certs(directory: Path, *, host: str | None = None, now: dt.datetime | None = None) -> ServerCerts:
    """The server's files in ``directory``, all checked (see :func:`check_certificate`); every
    ``*.pub`` there is a node public key to register."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CertError(f"--certs {directory} is not a directory (make one: odl-fed certs {directory} --nodes N)")
    certs = ServerCerts(ca=directory / CA_CERT, cert=directory / SERVER_CERT, key=directory / SERVER_KEY,
                        node_keys=tuple(sorted(directory.glob("*.pub"))))
    check_certificate(certs.cert, ca_path=certs.ca, key_path=certs.key, host=host, now=now)
    if not certs.node_keys:
        raise CertError(f"--certs {directory} holds no node public key (*.pub): no SuperNode could "
                        f"authenticate (odl-fed certs DIR --node NAME makes one)")
    for path in certs.node_keys:
        check_node_public_key(path)
    return certs


def _share_files(nodes: list[str]) -> dict[str, list[str]]:
    """What each share of a split certificates directory holds: one share per container."""
    shares = {"ca": [CA_CERT, CA_KEY], "server": [CA_CERT, SERVER_CERT, SERVER_KEY] + [f"node-{n}.pub" for n in nodes]}
    shares |= {f"node-{n}": [CA_CERT, f"node-{n}.key"] for n in nodes}
    return shares


def _split_problem(root: Path, nodes: list[str], hosts: tuple[str, ...] | list[str]) -> str | None:
    """Why the split directory ``root`` cannot be kept as it is (None: every share is whole and checks out)."""
    shares = _share_files(nodes)
    for share, names in shares.items():
        for name in names:
            if not (root / share / name).is_file():
                return f"{root / share / name} is missing"
    try:
        certs = server_certs(root / "server", host=hosts[0] if hosts else None)
        ca = (root / "ca" / CA_CERT).read_bytes()
        for share in shares:
            if (root / share / CA_CERT).read_bytes() != ca:
                return f"{root / share / CA_CERT} is not the CA of {root / 'ca'}"
        for node in nodes:
            key = root / f"node-{node}" / f"node-{node}.key"
            check_node_key(key)
            public = serialization.load_ssh_private_key(key.read_bytes(), password=None).public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            if not (root / "server" / f"node-{node}.pub").read_bytes().startswith(public):
                return f"{key} does not match {root / 'server' / f'node-{node}.pub'}"
        check_certificate(certs.cert, ca_path=root / "ca" / CA_CERT, host=None)
        for host in hosts[1:]:
            check_certificate(certs.cert, ca_path=certs.ca, host=host)
        # nothing expires within a day: a run started now would not end with an expired certificate
        check_certificate(certs.cert, ca_path=certs.ca, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    except CertError as error:
        return str(error)
    return None


def make_split_certs(root: Path, *, nodes: list[str], hosts: tuple[str, ...] | list[str] = (),
                     days: int = DEFAULT_DAYS) -> tuple[list[Path], str | None]:
    """A certificates directory split into one share per container, made only when it is not whole.

    ``root/ca/`` (``ca.crt``, ``ca.key``: for no container but this one), ``root/server/`` (``ca.crt``, the
    server's certificate and key, every node's ``.pub``) and ``root/node-<name>/`` (``ca.crt`` and that
    node's key), so each container mounts only its own share (a compose file's volumes). When every file
    is there and checks out (one CA, the server's certificate valid for ``hosts`` for at least a day,
    each key matching its ``.pub``) nothing is written. Otherwise every share is made again (a half-made
    set is repaired, not patched); a non-empty directory where a file belongs is one error naming it.
    Returns the files written and why (None when nothing was).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CertError(f"{root} is a file, not a directory: give odl-fed certs a directory to write in")
    problem = _split_problem(root, nodes, hosts) if root.is_dir() else f"{root} does not exist"
    if problem is None:
        return [], None
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        made = make_certs(Path(scratch), nodes=nodes, hosts=hosts, days=days)
        by_name = {path.name: path for path in made}
        for share, names in _share_files(nodes).items():
            directory = root / share
            directory.mkdir(parents=True, exist_ok=True)
            _clear_stand_ins([directory / n for n in names if (directory / n).is_dir()], force=True)
            for stale in directory.glob("node-*"):  # keys of nodes the fleet no longer has
                if stale.is_file() and stale.name not in names:
                    stale.unlink()
            for name in names:
                data = by_name[name].read_bytes()
                _write(directory / name, data, private=name.endswith(".key"))
                written.append(directory / name)
    return written, problem

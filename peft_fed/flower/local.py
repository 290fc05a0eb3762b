"""Certificates, node keys, and a whole Flower deployment on this machine's loopback.

* :func:`make_certificates`: a CA and a SuperLink certificate signed by it (``subjectAltName`` for the given hosts),
  with the ``cryptography`` library;
* :func:`make_node_key`: a SuperNode's authentication key pair (EC P-384, OpenSSH format, what Flower reads);
* :class:`LocalDeployment`: a SuperLink and N SuperNodes as local processes (TLS and node authentication on by
  default), ``flwr run`` of an app against them, and every process stopped on exit. ``peft-fed deploy`` and the
  tests use it; ``docs/deployment.md`` gives the same commands for real machines.

Every process binds 127.0.0.1 only, runs in its own process group (stopped as a group), and logs to a file in the
deployment's folder. Flower's offline needs are set here: ``--disable-runtime-dependency-installation`` (the app's
dependencies are already installed), ``FLWR_TELEMETRY_ENABLED=0``, and a private ``FLWR_HOME``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONNECTION = "peft-fed-local"
#: the Flower app every deployment runs (``examples/flower_app`` is this folder)
APP_DIR = Path(__file__).with_name("flower_app")
FINISHED = "finished"


class DeploymentError(RuntimeError):
    """A local deployment that could not start, or a run that did not finish well."""


@dataclass(frozen=True)
class Certificates:
    ca_certificate: Path
    server_certificate: Path
    server_key: Path


def make_certificates(folder: str | os.PathLike, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30) -> Certificates:
    """A self-signed CA and a server certificate it signs, valid for ``hosts`` (IP addresses or DNS names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peft-fed deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    return paths


def make_node_key(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair ``(NAME, NAME.pub)`` in OpenSSH format (EC P-384)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{process.args[0]} exited with {process.returncode}: see {log}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{process.args[0]} did not open port {port} within {timeout:.0f} s: see {log}")


def _flwr_executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, TLS and node authentication on unless disabled.

    Node ``i`` serves client ``i`` (``partition-id=i``) and keeps its state in ``FOLDER/node-i/state``; give
    ``node_configs`` to set other keys (``data-path``, ``client-id``...). Use it as a context manager: every
    process it started is stopped on exit, whatever happened.

        with LocalDeployment("runs/deploy", num_nodes=3) as deployment:
            deployment.run("examples/flower_app", {"num_rounds": 2}, timeout=1800)
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        num_nodes: int,
        *,
        tls: bool = True,
        node_auth: bool = True,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if node_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.folder = Path(folder).absolute()
        self.num_nodes = num_nodes
        self.tls = tls
        self.node_auth = node_auth
        self.node_configs = {i: dict((node_configs or {}).get(i, {})) for i in range(num_nodes)}
        self.startup_timeout = startup_timeout
        self.port = 0
        self.certificates: Certificates | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_HOME": str(self.folder / "flwr-home"),
            "PYTHONUNBUFFERED": "1",
        }

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.folder / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder, start_new_session=True
            )
        self.processes[name] = process
        return process

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_flwr_executable("flwr"), *args], env=self.env, cwd=self.folder, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> LocalDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link = [_flwr_executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--database", str(self.folder / "superlink.db")]  # fmt: skip
        if self.tls:
            self.certificates = make_certificates(self.folder / "certificates")
            link += ["--ssl-ca-certfile", str(self.certificates.ca_certificate),
                     "--ssl-certfile", str(self.certificates.server_certificate),
                     "--ssl-keyfile", str(self.certificates.server_key)]  # fmt: skip
            if self.node_auth:
                link.append("--enable-supernode-auth")
        else:
            link.append("--insecure")
        self._write_flower_config()
        process = self._spawn("superlink", link)
        _wait_for_port(self.port, process, self.folder / "logs" / "superlink.log", self.startup_timeout)
        for index in range(self.num_nodes):
            self.start_node(index)
        return self

    def _write_flower_config(self) -> None:
        home = self.folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.port}"']
        if self.tls:
            lines.append(f'root-certificates = "{self.certificates.ca_certificate}"')
        else:
            lines.append("insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def register_node_key(self, public_key: Path) -> None:
        done = self._flwr("supernode", "register", str(public_key), CONNECTION)
        if done.returncode != 0:
            raise DeploymentError(f"flwr supernode register failed: {(done.stderr or done.stdout).strip()[-400:]}")

    def start_node(self, index: int, *, register: bool = True) -> subprocess.Popen:
        """Start SuperNode ``index`` (again, after :meth:`kill_node`: the same key, config and state folder)."""
        config = {"partition-id": index, "state-dir": str(self.folder / f"node-{index}" / "state"), **self.node_configs[index]}
        node = [_flwr_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", _node_config_text(config)]  # fmt: skip
        if self.tls:
            node += ["--root-certificates", str(self.certificates.ca_certificate)]
            if self.node_auth:
                key_dir = self.folder / "node-keys"
                private = key_dir / f"node-{index}"
                if not private.is_file():
                    private, public = make_node_key(key_dir, f"node-{index}")
                    if register:
                        self.register_node_key(public)
                node += ["--auth-supernode-private-key", str(private)]
        else:
            node.append("--insecure")
        return self._spawn(f"supernode-{index}", node)

    def wait_for_log(self, name: str, text: str, count: int = 1, timeout: float = 300.0) -> None:
        """Wait until ``text`` appears ``count`` times in process ``name``'s log (e.g. a node's messages)."""
        log = self.folder / "logs" / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.is_file() and log.read_text(errors="replace").count(text) >= count:
                return
            time.sleep(0.2)
        raise DeploymentError(f"{text!r} did not appear {count} time(s) in {log} within {timeout:.0f} s")

    def kill_node(self, index: int) -> None:
        """Kill SuperNode ``index`` and its ClientApp processes at once (a machine that dies)."""
        _kill_group(self.processes.pop(f"supernode-{index}"), signal.SIGKILL)

    def stop(self) -> None:
        for name in list(self.processes)[::-1]:
            _kill_group(self.processes.pop(name), signal.SIGTERM)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ runs

    def submit(self, app: str | os.PathLike, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run APP``: the run's id."""
        args = ["run", str(Path(app).absolute()), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        done = self._flwr(*args, timeout=300)
        try:
            return int(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-600:]}") from None

    def status(self, run_id: int) -> str:
        done = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            (run,) = json.loads(done.stdout)["runs"]
            return str(run["status"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"flwr ls failed: {(done.stdout + done.stderr).strip()[-400:]}") from None

    def wait(self, run_id: int, timeout: float) -> str:
        """Wait for the run to end; its final status (``flwr run`` returns before the ServerApp finishes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith(FINISHED):
                return status
            if self.processes.get("superlink") is not None and self.processes["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink exited: see {self.folder / 'logs' / 'superlink.log'}")
            time.sleep(2.0)
        raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s (status {self.status(run_id)!r})")

    def logs(self, run_id: int) -> str:
        return self._flwr("log", str(run_id), CONNECTION, "--show").stdout

    def run(self, app: str | os.PathLike, run_config: Mapping[str, Any] | None = None, *, timeout: float = 3600) -> int:
        """Submit a run, wait for it, and raise with the ServerApp's log tail unless it finished successfully."""
        run_id = self.submit(app, run_config)
        status = self.wait(run_id, timeout)
        log = self.folder / "logs" / f"run-{run_id}.log"
        log.write_text(self.logs(run_id))  # the ServerApp's log, kept after the deployment stops
        if "completed" not in status:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
            raise DeploymentError(f"run {run_id} ended {status!r}: {cause.strip()} (the ServerApp's log: {log})")
        return run_id


def _toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _node_config_text(config: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=15)

"""``peft-fed deploy`` and ``peft-fed certificates``: bad input is one line before any process starts; the
certificates are what Flower reads."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from peft_fed.cli import main  # noqa: E402


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_nodes", "2", "--num_clients", "3"], "one node per client: --num_clients 3 needs --num_nodes 3"),
        (["--min_replies", "0"], "min_replies must be >= 1, got 0"),
        (["--round_timeout", "-5"], "round_timeout must be > 0, got -5.0"),
        (["--method", "fedit", "--zeta", "0.5"], "zeta"),
        (["--method", "flexlora", "--secure_aggregation"], "secure aggregation refused: flexlora's server needs more"),
        (["--method", "fedit", "--secure_aggregation", "--dp_clip", "1", "--dp_noise_multiplier", "2"],
         "secure aggregation refused: secagg_clipping_range=8 would clip the clients' DP noise: set it >= 13.7"),
    ],
)
def test_deploy_refuses_bad_settings_in_one_line(argv, message, tmp_path, capsys):
    assert main(["deploy", "--deployment_dir", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "d" / "flower").exists()  # nothing was started


def test_certificates_are_readable_by_flower_and_never_overwritten(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    out = tmp_path / "certs"
    assert main(["certificates", "--hosts", "10.0.0.1", "server.example.org", "--node_keys", "a", "--output_dir", str(out)]) == 0
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org"]
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    # the formats Flower's SuperNode and `flwr supernode register` load (OpenSSH, an EC key on a NIST curve)
    assert isinstance(load_ssh_private_key((out / "node-keys" / "a").read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key((out / "node-keys" / "a.pub").read_bytes()), ec.EllipticCurvePublicKey)
    assert oct((out / "node-keys" / "a").stat().st_mode & 0o777) == "0o600"
    before = (out / "ca.crt").read_bytes()
    assert main(["certificates", "--output_dir", str(out)]) == 2
    assert "already holds certificates" in capsys.readouterr().err and (out / "ca.crt").read_bytes() == before


def test_the_flower_app_lets_every_deployment_setting_be_overridden():
    """``flwr run --run-config`` accepts only keys the app's pyproject.toml lists."""
    import dataclasses

    import tomllib

    from peft_fed.flower.local import APP_DIR
    from peft_fed.flower.settings import DeploymentArguments

    listed = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {f.name for f in dataclasses.fields(DeploymentArguments)} <= set(listed)
    assert all(value == "" for value in listed.values())  # every default is peft-fed's own

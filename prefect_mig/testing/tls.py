"""Throwaway certificates for tests of TLS endpoints (an external Redis, a Docker engine on TCP).

`make_certs` makes a CA and, for each name, a key and a certificate that CA signed, valid for
``127.0.0.1`` (subjectAltName), with the ``openssl`` command line tool.

Examples:
    ```python
    import tempfile
    from pathlib import Path
    from prefect_mig.testing.tls import make_certs

    certs = make_certs(Path(tempfile.mkdtemp()))
    assert certs["client.pem"].read_text().startswith("-----BEGIN CERTIFICATE-----")
    ```
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs(d: Path, names: tuple[str, ...] = ("server", "client")) -> dict[str, Path]:
    """``ca.pem`` (and ``ca.key``) plus ``<name>.pem`` / ``<name>.key`` for each name, in `d`."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in names:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(d / f"{name}.pem"))
    return {n: d / n for n in ("ca.pem", *(f"{name}.{ext}" for name in names for ext in ("pem", "key")))}

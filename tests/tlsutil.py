"""Test certificates: a throwaway CA and a server certificate signed by it (openssl CLI).

    tls = make_tls(tmp_path, hosts=["127.0.0.1", "localhost"])
    tls.ca, tls.cert, tls.key  # PEM file paths

A second, unrelated CA (make_tls(..., name="other")) lets a test check that a client refuses
a certificate its CA file did not sign.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_tls(directory: Path, hosts: list[str], name: str = "sandtrace-test") -> TLSFiles:
    """A CA and a server certificate for `hosts` (IP addresses or DNS names) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = (
        directory / f"{name}.key",
        directory / f"{name}.csr",
        directory / f"{name}.pem",
    )
    ext = directory / f"{name}.ext"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        f"/CN={name} CA",
    )
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={hosts[0]}",
    )
    alt = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            alt.append(f"IP:{h}")
        except ValueError:
            alt.append(f"DNS:{h}")
    ext.write_text(
        f"subjectAltName={','.join(alt)}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    key.chmod(0o600)
    return TLSFiles(ca=ca, cert=cert, key=key)

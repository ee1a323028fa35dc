"""CurveZMQ keys of a deployment: `zeroserve keys generate NAME --role ROLE`, and loading them.

One directory holds every key, and every process takes it from one setting (`--keys DIR`, or
``ZEROSERVE_KEYS``):

    DIR/public/<role>/<name>.key       public halves; role: broker, client, worker or admin
    DIR/secret/<name>.key_secret       each keypair with its secret half (0600, dir 0700)

The broker admits a peer by its public key and role (ZAP, RFC 27): its frontend takes client
and admin keys, its backend worker keys. A peer needs its own keypair and the broker's public
key. Nothing here binds or connects; `curve_client`/`curve_server` set socket options, which
must happen before connect/bind.
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

ROLES = ("broker", "client", "worker", "admin")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class KeysError(ValueError):
    """A key directory or keypair that is missing or unsafe."""


def default_dir() -> str:
    from zeroserve.config import instance_name

    return os.environ.get("ZEROSERVE_KEYS") or os.path.join(
        os.path.expanduser("~"), ".zeroserve", "keys", instance_name())


@dataclass(frozen=True)
class PeerKeys:
    """What one process needs for CURVE: its own keypair, and the broker's public key."""

    public: bytes
    secret: bytes
    broker: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike[str], name: str) -> PeerKeys:
        d = Path(directory)
        secret_file = d / "secret" / f"{name}.key_secret"
        if not secret_file.is_file():
            raise KeysError(f"no keypair {name!r} in {d} (zeroserve keys generate {name} "
                            f"--role ROLE --dir {d})")
        if secret_file.stat().st_mode & 0o077:
            raise KeysError(f"{secret_file} is readable by others: chmod 600 it")
        public, secret = zmq.auth.load_certificate(secret_file)
        brokers = sorted((d / "public" / "broker").glob("*.key"))
        if len(brokers) != 1:
            raise KeysError(f"{d}/public/broker must hold exactly one broker key "
                            f"(found {len(brokers)})")
        broker, _ = zmq.auth.load_certificate(brokers[0])
        assert secret is not None
        return cls(public, secret, broker)


def allowlists(directory: str | os.PathLike[str]) -> dict[str, set[bytes]]:
    """role -> the z85 public keys of that role. Whoever can add a file to public/ROLE/ (or
    swap the folders above it) can let themselves in: each must be this user's or root's and
    writable by no one else."""
    out: dict[str, set[bytes]] = {}
    d = Path(directory)
    for role in ROLES:
        folder = d / "public" / role
        for path in (d, d / "public", folder):
            _trusted(path)
        out[role] = set()
        for f in sorted(folder.glob("*.key")):
            _trusted(f)
            out[role].add(zmq.auth.load_certificate(f)[0])
    return out


def _trusted(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
        raise KeysError(f"{path} is owned by uid {st.st_uid} with mode "
                        f"{stat.S_IMODE(st.st_mode):o}: another user could add a key; "
                        "chmod go-w it (and keep it this user's)")


def generate(directory: str | os.PathLike[str], name: str, role: str) -> tuple[Path, Path]:
    """Write a keypair: the public half under public/<role>/, the whole under secret/."""
    if role not in ROLES:
        raise KeysError(f"role must be one of {', '.join(ROLES)}")
    if not name or not set(name) <= NAME_CHARS:
        raise KeysError("a key name is letters, digits, '-', '_' and '.'")
    d = Path(directory)
    secret_dir, public_dir = d / "secret", d / "public" / role
    for path in (d, secret_dir, d / "public", public_dir):
        path.mkdir(mode=0o700, exist_ok=True, parents=True)
    secret_dir.chmod(0o700)
    if (secret_dir / f"{name}.key_secret").exists():
        raise KeysError(f"a keypair named {name!r} exists already in {d}")
    if role == "broker" and any(public_dir.glob("*.key")):
        raise KeysError(f"{public_dir} has a broker key already")
    old = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(secret_dir, name)
    finally:
        os.umask(old)
    os.replace(public_file, public_dir / f"{name}.key")
    os.chmod(secret_file, 0o600)
    return public_dir / f"{name}.key", Path(secret_file)


def add_arguments(ap: argparse.ArgumentParser, key_name: str) -> None:
    """--keys, --key-name and --insecure: the same three flags on every process."""
    ap.add_argument("--keys", default=None,
                    help="CURVE key directory (default: ZEROSERVE_KEYS; none: no CURVE)")
    ap.add_argument("--key-name", default=key_name, help="this process's keypair")
    ap.add_argument("--insecure", action="store_true", help="allow tcp without CURVE")


def keys_dir(args: argparse.Namespace) -> str:
    return args.keys or os.environ.get("ZEROSERVE_KEYS", "")


def curve_client(sock: zmq.Socket, keys: PeerKeys) -> None:
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.broker


def curve_server(sock: zmq.Socket, keys: PeerKeys, domain: str) -> None:
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


class Allowlist:
    """The ZAP credentials callback: a domain admits the public keys of its roles."""

    def __init__(self, keys: dict[str, set[bytes]], roles_of: dict[str, tuple[str, ...]]) -> None:
        self.allowed = {domain: set().union(*(keys[r] for r in roles))
                        for domain, roles in roles_of.items()}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed.get(domain, ())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve keys", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="write a keypair")
    gen.add_argument("name")
    gen.add_argument("--role", required=True, choices=ROLES)
    gen.add_argument("--dir", default=None, help="the key directory (default: ZEROSERVE_KEYS "
                                                 "or ~/.zeroserve/keys/<instance>)")
    args = ap.parse_args(argv)
    try:
        public, secret = generate(args.dir or default_dir(), args.name, args.role)
    except KeysError as exc:
        print(f"zeroserve keys: {exc}")
        return 2
    print(f"{args.role} key {args.name}: public {public}, secret {secret}")
    return 0

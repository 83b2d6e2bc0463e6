"""Keyed pseudonyms: HMAC-SHA-256 of patient ids and source paths under a secret key the hospital keeps.

A plain hash of a patient id can be reversed by trying the id formats a hospital uses; a keyed one cannot without
the key. The same key gives the same pseudonyms (a dataset can be extended later); another key gives unrelated
ones. Datasets, reports and model cards record that pseudonyms are keyed and the key's id, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "SONOGEN_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
HOW_TO_GET_ONE = (f"set {KEY_ENV} to a secret of at least {MIN_KEY_BYTES * 2} hex digits or pass "
                  "--pseudonym-key-file FILE; create one with --new-pseudonym-key FILE (outside the dataset "
                  "folder, never in git: whoever holds it can test guesses of patient ids)")


class PseudonymKey:
    def __init__(self, secret: bytes):
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key has {len(secret) * 8} bits; at least {MIN_KEY_BYTES * 8} are needed")
        self._secret = secret

    @classmethod
    def from_text(cls, text: str, where: str) -> PseudonymKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as err:
            raise ValueError(f"{where}: the pseudonym key must be hex digits ({err})") from None

    def digest(self, kind: str, value: str, length: int = 16) -> str:
        """``length`` hex digits of HMAC-SHA-256 over ``kind:value`` (the kind keeps uses of one value apart)."""
        return hmac.new(self._secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]

    @property
    def key_id(self) -> str:
        """A name for the key that reveals nothing of it: which key made a dataset, to extend it with the same."""
        return self.digest("key-id", "sonogen", 12)

    def __repr__(self) -> str:  # never the secret, in a traceback or a log
        return f"PseudonymKey(id={self.key_id})"


def load_key(key_file: str | Path | None = None) -> PseudonymKey | None:
    """The key in ``key_file``, else in ``$SONOGEN_PSEUDONYM_KEY``; None when neither is given."""
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise FileNotFoundError(f"pseudonym key file {path} not found; {HOW_TO_GET_ONE}")
        return PseudonymKey.from_text(path.read_text(), str(path))
    if os.environ.get(KEY_ENV):
        return PseudonymKey.from_text(os.environ[KEY_ENV], KEY_ENV)
    return None


def require_key(key_file: str | Path | None = None) -> PseudonymKey:
    key = load_key(key_file)
    if key is None:
        raise ValueError(f"no pseudonym key: {HOW_TO_GET_ONE}")
    return key


def create_key(path: str | Path, dataset: str | Path) -> PseudonymKey:
    """A new 256-bit key written to ``path`` (mode 0600), which must not exist nor lie inside ``dataset``."""
    path, dataset = Path(path).absolute(), Path(dataset).absolute()
    if path == dataset or dataset in path.parents:
        raise ValueError(f"{path} is inside the dataset folder {dataset}: keep the key apart from the data")
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: a key is never overwritten (the pseudonyms made with it would no "
                              f"longer match); pass it with --pseudonym-key-file") from None
    with os.fdopen(descriptor, "w") as f:
        f.write(secret.hex() + "\n")
    return PseudonymKey(secret)

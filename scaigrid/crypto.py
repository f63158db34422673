"""Backend credentials at rest: Fernet tokens under SCAIGRID_ENCRYPTION_KEY, readable only by this node's key."""

from cryptography.fernet import Fernet, InvalidToken

from scaigrid.settings import Settings


class UndecryptableCredential(Exception):
    """A stored credential that this node's SCAIGRID_ENCRYPTION_KEY cannot open (key changed, or data damaged)."""


def _cipher(settings: Settings) -> Fernet:
    settings.require("encryption")
    assert settings.auth.encryption_key is not None  # require() guarantees it; this narrows the type
    return Fernet(settings.auth.encryption_key.reveal().encode())


def encrypt(settings: Settings, plaintext: str) -> str:
    """A Fernet token of `plaintext` (raises ConfigError when SCAIGRID_ENCRYPTION_KEY is not set)."""
    return _cipher(settings).encrypt(plaintext.encode()).decode()


def decrypt(settings: Settings, token: str) -> str:
    """The plaintext of a token made by `encrypt` under the same key."""
    try:
        return _cipher(settings).decrypt(token.encode()).decode()
    except InvalidToken:
        raise UndecryptableCredential(
            "a stored backend credential cannot be decrypted with SCAIGRID_ENCRYPTION_KEY "
            "(was the key changed?); set the backend's api_key again") from None

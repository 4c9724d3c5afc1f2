"""What a config's encryption setting makes of names and manifests.

With encryption on, a name becomes a keyed object id (HMAC-SHA256 under a subkey of the
master key) and a manifest is sealed with the master key before it leaves the client,
so a server sees neither names nor sizes nor hashes of the plaintext. With encryption
off, ids are the plain SHA-256 of the name and manifests are stored as they are.

Opening is strict in both directions: an encrypted setup never accepts an unsealed
manifest (a server could forge one to downgrade a file to plaintext), and a setup with
encryption off names a sealed manifest as such instead of failing obscurely, and refuses
an unsealed manifest that claims encryption (only a sealed one may carry a file key).
"""

from __future__ import annotations

from ._crypto import (
    DecryptionFailed,
    PayloadCipher,
    derive_key,
    key_id,
    manifest_key_id,
    object_id,
    open_manifest,
    seal_manifest,
)
from ._errors import ConfigError, IntegrityError, WrongKeyError
from ._manifest import Manifest
from ._names import object_id_for, validate_name

__all__ = ["Keyring"]


class Keyring:
    """The keys of one client: ``master`` is None when encryption is off."""

    def __init__(self, master: bytes | None) -> None:
        self._master = master
        self._id_key = derive_key(master, "object-id") if master is not None else None
        self.key_id = key_id(master).hex() if master is not None else None

    @property
    def encrypted(self) -> bool:
        return self._master is not None

    def object_id(self, name: str) -> str:
        """The id the servers store ``name`` under."""
        validate_name(name)
        if self._id_key is None:
            return object_id_for(name)
        return object_id(self._id_key, name)

    def seal(self, oid: str, manifest: Manifest) -> bytes:
        """The manifest as it is sent to the servers (sealed once, identical on both)."""
        body = manifest.to_bytes()
        if self._master is None:
            return body
        return seal_manifest(self._master, oid, body)

    def open(self, oid: str, stored: bytes, label: str, name: str | None = None) -> Manifest:
        """The manifest a server holds under ``oid``, authenticated when encryption is on.

        ``name``, when known, is only used in messages.
        """
        of = f" of {name!r}" if name is not None else ""
        kid = manifest_key_id(stored)
        if self._master is None:
            if kid is not None:
                raise ConfigError(
                    f"the {label} holds the file{of} encrypted, but this config has encryption "
                    "off: use the config (and key_file) it was stored with"
                )
            manifest = Manifest.from_bytes(stored, server=label)
            if manifest.encrypted:
                # Only a sealed manifest may say so: an unsealed one carrying a file key
                # would have us trust data and a digest its writer chose.
                raise IntegrityError(
                    f"the {label} holds an unsealed manifest{of} that says the file is "
                    "encrypted: it was forged or damaged there",
                    server=label,
                )
            return manifest
        if kid is None:
            raise IntegrityError(
                f"the {label} holds a manifest{of} that is not sealed with this setup's key: "
                "it was forged or damaged there",
                server=label,
            )
        if kid.hex() != self.key_id:
            raise WrongKeyError(
                f"the {label} holds the file{of} sealed with another master key (key id "
                f"{kid.hex()}; this config's key is {self.key_id}): use the key it was "
                "stored with ('splitstore key import')"
            )
        try:
            body = open_manifest(self._master, oid, stored)
        except DecryptionFailed:
            raise IntegrityError(
                f"the {label}'s manifest{of} does not authenticate: it was forged, "
                "damaged, or is another file's",
                server=label,
            ) from None
        manifest = Manifest.from_bytes(body, server=label)
        if not manifest.encrypted:
            raise IntegrityError(
                f"the {label}'s sealed manifest describes an unencrypted file", server=label
            )
        return manifest

    def payload_cipher(self, oid: str, manifest: Manifest) -> PayloadCipher | None:
        """The cipher of a version's data, or None for a file stored unencrypted."""
        if manifest.file_key is None:
            return None
        return PayloadCipher(bytes.fromhex(manifest.file_key), oid, manifest.version_id)

"""The tenants registry: token hashes only, re-read on change, broken edits ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from splitstore import ConfigError, UsageError
from splitstore._tenants import TenantRegistry, add_tenant, put_tenant, revoke_tenant


def bump(path: Path) -> None:
    """Make sure the registry sees a change even within the file system's time resolution."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_add_authenticate_revoke(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    add_tenant(path, "alice", "tok-alice", quota_bytes=100)
    assert "tok-alice" not in path.read_text()
    registry = TenantRegistry(tenants_file=path)
    alice = registry.authenticate("tok-alice")
    assert alice is not None
    assert (alice.name, alice.quota_bytes) == ("alice", 100)
    assert registry.authenticate("tok-bob") is None
    add_tenant(path, "bob", "tok-bob")
    bump(path)
    bob = registry.authenticate("tok-bob")
    assert bob is not None
    assert bob.name == "bob"
    revoke_tenant(path, "alice")
    bump(path)
    assert registry.authenticate("tok-alice") is None
    with pytest.raises(UsageError):
        revoke_tenant(path, "alice")
    with pytest.raises(UsageError):
        add_tenant(path, "bob", "again")
    with pytest.raises(UsageError):
        add_tenant(path, "../evil", "x")


def test_broken_edit_keeps_the_old_tenants(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    add_tenant(path, "alice", "tok")
    registry = TenantRegistry(tenants_file=path)
    path.write_text("[tenants.alice\n")
    bump(path)
    assert registry.authenticate("tok") is not None


def test_single_token_mode(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-token\n")
    registry = TenantRegistry(token_file=tmp_path / "token")
    tenant = registry.authenticate("secret-token")
    assert tenant is not None
    assert tenant.name == "default"
    assert registry.authenticate("") is None
    with pytest.raises(ConfigError):
        TenantRegistry()


def test_a_token_that_is_not_unicode_matches_nothing(tmp_path: Path) -> None:
    """A lone surrogate (JSON may carry one) was hashed as "?": never as another token."""
    path = tmp_path / "tenants.toml"
    put_tenant(path, "alice", "abc?def")
    registry = TenantRegistry(tenants_file=path)
    assert registry.authenticate("abc?def") is not None
    assert registry.authenticate("abc\ud800def") is None

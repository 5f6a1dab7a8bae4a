"""The site registry: tokens bound to certificate names, replacement on re-register, the site cap, liveness."""

from __future__ import annotations

import types

import pytest

import fedserver.registry as registry_module
from fedserver.registry import UNBOUND, ClientRegistry, RegistryError


def fp(cert_name: str) -> str:
    """A stand-in certificate fingerprint, one per certificate name."""
    return f"fingerprint-of-{cert_name}"


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """Replaces the registry module's view of time (only that module's)."""
    fake = FakeClock()
    monkeypatch.setattr(registry_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_register_returns_a_session_whose_token_authenticates_its_site():
    reg = ClientRegistry()
    session = reg.register("site-1", "site-1", None, fp("site-1"))
    assert session.name == "site-1" and len(session.token) >= 32
    assert reg.authenticate(session.token, "site-1", fp("site-1")) is session
    assert reg.names() == {"site-1"}


def test_tokens_differ_between_sites():
    reg = ClientRegistry()
    first = reg.register("site-1", "site-1", None, fp("site-1"))
    assert first.token != reg.register("site-2", "site-2", None, fp("site-2")).token


@pytest.mark.parametrize(
    "name, cert_name",
    [("site-2", "site-1"), ("site-1", None), ("", "")],
    ids=["other-name", "no-certificate", "empty-name"],
)
def test_register_requires_the_name_of_the_certificate(name, cert_name):
    reg = ClientRegistry()
    with pytest.raises(RegistryError) as err:
        reg.register(name, cert_name, None, fp(cert_name))
    assert err.value.code == "permission_denied"
    assert reg.names() == set()


def test_register_under_another_name_says_which_names_differ():
    with pytest.raises(RegistryError, match="'site-2' does not match the certificate's name 'site-1'"):
        ClientRegistry().register("site-2", "site-1", None, fp("site-1"))


def test_re_register_replaces_the_old_token():
    reg = ClientRegistry()
    old = reg.register("site-1", "site-1", None, fp("site-1"))
    new = reg.register("site-1", "site-1", None, fp("site-1"))
    assert new.token != old.token
    with pytest.raises(RegistryError, match="register again") as err:
        reg.authenticate(old.token, "site-1", fp("site-1"))
    assert err.value.code == "unauthenticated"
    assert reg.authenticate(new.token, "site-1", fp("site-1")) is new
    assert reg.names() == {"site-1"}


@pytest.mark.parametrize("token", [None, "", "forged"])
def test_unknown_token_is_unauthenticated(token):
    reg = ClientRegistry()
    reg.register("site-1", "site-1", None, fp("site-1"))
    with pytest.raises(RegistryError) as err:
        reg.authenticate(token, "site-1", fp("site-1"))
    assert err.value.code == "unauthenticated"


def test_max_sites_refuses_a_new_site_at_the_cap():
    reg = ClientRegistry()
    reg.register("site-1", "site-1", 2, fp("site-1"))
    reg.register("site-2", "site-2", 2, fp("site-2"))
    with pytest.raises(RegistryError, match="at most 2 sites") as err:
        reg.register("site-3", "site-3", 2, fp("site-3"))
    assert err.value.code == "resource_exhausted"
    assert reg.names() == {"site-1", "site-2"}


def test_re_registering_an_existing_site_is_allowed_at_the_cap():
    reg = ClientRegistry()
    reg.register("site-1", "site-1", 2, fp("site-1"))
    reg.register("site-2", "site-2", 2, fp("site-2"))
    again = reg.register("site-2", "site-2", 2, fp("site-2"))
    assert reg.authenticate(again.token, "site-2", fp("site-2")) is again
    assert reg.names() == {"site-1", "site-2"}


def test_a_removed_site_frees_its_place_under_the_cap():
    reg = ClientRegistry()
    reg.register("site-1", "site-1", 1, fp("site-1"))
    assert reg.remove("site-1") is True
    reg.register("site-2", "site-2", 1, fp("site-2"))
    assert reg.names() == {"site-2"}


def test_token_presented_with_another_sites_certificate_is_permission_denied():
    reg = ClientRegistry()
    s1 = reg.register("site-1", "site-1", None, fp("site-1"))
    reg.register("site-2", "site-2", None, fp("site-2"))
    with pytest.raises(RegistryError, match="belongs to 'site-1', the certificate is 'site-2'") as err:
        reg.authenticate(s1.token, "site-2", fp("site-2"))
    assert err.value.code == "permission_denied"


def test_remove_invalidates_the_token():
    reg = ClientRegistry()
    s1 = reg.register("site-1", "site-1", None, fp("site-1"))
    assert reg.remove("site-1") is True
    assert reg.remove("site-1") is False
    with pytest.raises(RegistryError) as err:
        reg.authenticate(s1.token, "site-1", fp("site-1"))
    assert err.value.code == "unauthenticated"


def test_drop_silent_drops_only_sites_silent_longer_than_the_timeout(clock):
    reg = ClientRegistry()
    quiet = reg.register("site-1", "site-1", None, fp("site-1"))
    clock.now += 5
    chatty = reg.register("site-2", "site-2", None, fp("site-2"))
    clock.now += 5
    reg.authenticate(chatty.token, "site-2", fp("site-2"))  # contact refreshes liveness
    clock.now += 6  # site-1 silent for 16 s, site-2 for 6 s
    assert reg.drop_silent(10) == ["site-1"]
    assert reg.names() == {"site-2"}
    with pytest.raises(RegistryError) as err:
        reg.authenticate(quiet.token, "site-1", fp("site-1"))
    assert err.value.code == "unauthenticated"
    assert reg.authenticate(chatty.token, "site-2", fp("site-2")) is chatty


def test_drop_silent_keeps_a_site_silent_exactly_the_timeout(clock):
    reg = ClientRegistry()
    reg.register("site-1", "site-1", None, fp("site-1"))
    clock.now += 10
    assert reg.drop_silent(10) == []
    clock.now += 0.001
    assert reg.drop_silent(10) == ["site-1"]


def test_drop_silent_with_nothing_silent_drops_nothing(clock):
    reg = ClientRegistry()
    reg.register("site-1", "site-1", None, fp("site-1"))
    reg.register("site-2", "site-2", None, fp("site-2"))
    clock.now += 1
    assert reg.drop_silent(30) == []
    assert reg.names() == {"site-1", "site-2"}


def test_a_failed_authentication_does_not_refresh_liveness(clock):
    reg = ClientRegistry()
    s1 = reg.register("site-1", "site-1", None, fp("site-1"))
    clock.now += 20
    with pytest.raises(RegistryError):
        reg.authenticate(s1.token, "site-2", fp("site-2"))
    assert reg.drop_silent(10) == ["site-1"]


def test_a_token_is_refused_with_another_certificate_of_the_same_name():
    reg = ClientRegistry()
    session = reg.register("site-1", "site-1", None, fp("site-1"))
    with pytest.raises(RegistryError, match="issued to another certificate") as e:
        reg.authenticate(session.token, "site-1", "fingerprint-of-a-reissued-site-1")
    assert e.value.code == "permission_denied"


def test_removing_a_certificate_ends_only_the_session_opened_with_it():
    reg = ClientRegistry()
    revoked = reg.register("site-1", "site-1", None, fp("site-1"))
    reg.register("site-2", "site-2", None, fp("site-2"))
    assert reg.remove_certificate(fp("site-1")) == "site-1"
    assert reg.names() == {"site-2"}
    with pytest.raises(RegistryError, match="register again"):
        reg.authenticate(revoked.token, "site-1", fp("site-1"))
    assert reg.remove_certificate("unknown") is None


# ---- one session per (run, site): several runs train at once ------------------------------------------


def test_a_site_holds_one_session_per_run_each_with_its_own_token():
    reg = ClientRegistry()
    in_3 = reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    in_4 = reg.register("site-1", "site-1", None, fp("site-1"), run_number=4)
    assert in_3.token != in_4.token
    assert reg.authenticate(in_3.token, "site-1", fp("site-1")).run_number == 3
    assert reg.authenticate(in_4.token, "site-1", fp("site-1")).run_number == 4
    assert reg.run_names(3) == {"site-1"} and reg.run_names(4) == {"site-1"}
    assert reg.names() == {"site-1"}


def test_re_registering_in_one_run_leaves_the_sites_session_in_another():
    reg = ClientRegistry()
    old = reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    other = reg.register("site-1", "site-1", None, fp("site-1"), run_number=4)
    reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    with pytest.raises(RegistryError, match="register again"):
        reg.authenticate(old.token, "site-1", fp("site-1"))
    assert reg.authenticate(other.token, "site-1", fp("site-1")) is other


def test_max_sites_caps_the_sites_of_one_run_only():
    reg = ClientRegistry()
    reg.register("site-1", "site-1", 1, fp("site-1"), run_number=3)
    with pytest.raises(RegistryError, match="at most 1 sites") as err:
        reg.register("site-2", "site-2", 1, fp("site-2"), run_number=3)
    assert err.value.code == "resource_exhausted"
    reg.register("site-2", "site-2", 1, fp("site-2"), run_number=4)
    assert reg.run_names(3) == {"site-1"} and reg.run_names(4) == {"site-2"}


def test_remove_with_a_run_ends_only_that_runs_session():
    reg = ClientRegistry()
    in_3 = reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    in_4 = reg.register("site-1", "site-1", None, fp("site-1"), run_number=4)
    assert reg.remove("site-1", 3) is True
    assert reg.remove("site-1", 3) is False
    with pytest.raises(RegistryError, match="register again"):
        reg.authenticate(in_3.token, "site-1", fp("site-1"))
    assert reg.authenticate(in_4.token, "site-1", fp("site-1")) is in_4
    assert reg.remove("site-1") is True  # no run: every session of the site
    assert reg.names() == set()


def test_removing_a_revoked_certificate_ends_the_sites_sessions_in_every_run():
    reg = ClientRegistry()
    reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    reg.register("site-1", "site-1", None, fp("site-1"), run_number=4)
    reg.register("site-2", "site-2", None, fp("site-2"), run_number=4)
    assert reg.remove_certificate(fp("site-1")) == "site-1"
    assert reg.run_names(3) == set() and reg.run_names(4) == {"site-2"}


def test_binding_an_unbound_session_moves_it_into_the_run():
    reg = ClientRegistry()
    unbound = reg.register("site-1", "site-1", None, fp("site-1"))
    assert unbound.run_number == UNBOUND and reg.run_names(5) == set()
    replaced = reg.register("site-1", "site-1", None, fp("site-1"), run_number=5)
    reg.bind(unbound, 5)
    assert unbound.run_number == 5 and reg.run_names(5) == {"site-1"} and reg.run_names(UNBOUND) == set()
    assert reg.authenticate(unbound.token, "site-1", fp("site-1")) is unbound
    with pytest.raises(RegistryError, match="register again"):
        reg.authenticate(replaced.token, "site-1", fp("site-1"))
    reg.bind(unbound, 6)  # a bound session stays in its run
    assert unbound.run_number == 5


def test_drop_silent_by_run_uses_each_runs_timeout_and_says_which_run_lost_which_site(clock):
    reg = ClientRegistry()
    reg.register("site-1", "site-1", None, fp("site-1"), run_number=3)
    reg.register("site-1", "site-1", None, fp("site-1"), run_number=4)
    reg.register("site-2", "site-2", None, fp("site-2"), run_number=4)
    clock.now += 20
    timeouts = {3: 10.0, 4: 60.0}
    assert reg.drop_silent_by_run(timeouts.__getitem__) == {3: ["site-1"]}
    assert reg.run_names(3) == set() and reg.run_names(4) == {"site-1", "site-2"}
    clock.now += 41
    dropped = reg.drop_silent_by_run(timeouts.__getitem__)
    assert {run: sorted(sites) for run, sites in dropped.items()} == {4: ["site-1", "site-2"]}
    assert reg.names() == set()

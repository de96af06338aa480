"""The claim policy (jwtpgproxy.auth.policy): a pure function of claims, user, database and clock.

Every rule has a passing case and a failing case with its own Rejection code; details never
carry claim values beyond configured names. References: RFC 7519 (JWT) 4.1, RFC 8693 4.2 and
RFC 9068 2.2.3 (scope), RFC 8725 (JWT BCP).
"""

from __future__ import annotations

from typing import Any

import pytest

from jwtpgproxy.auth.policy import (
    ClaimPolicy,
    PolicyDecision,
    Rejection,
    is_numeric_date,
    parse_scopes,
)
from jwtpgproxy.errors import ConfigError, TokenRejected

NOW = 1_700_000_000.0
SECRET_MARKER = "s3cr3t-claim-value"


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 300, "iat": int(NOW) - 10}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def evaluate(
    policy: ClaimPolicy,
    payload: dict[str, Any],
    *,
    user: str = "alice",
    database: str | None = "app",
    leeway: float = 10.0,
) -> PolicyDecision:
    return policy.validate().evaluate(payload, user=user, database=database, now=NOW, leeway=leeway)


def accept(
    policy: ClaimPolicy,
    payload: dict[str, Any],
    *,
    user: str = "alice",
    database: str | None = "app",
    read_only: bool = False,
) -> PolicyDecision:
    """Assert the claims are accepted with the whole expected decision: the role is the
    startup user, read-only as given, and the session lapses at ``exp`` (without ``exp``:
    ``iat`` plus the maximum age)."""
    decision = evaluate(policy, payload, user=user, database=database)
    expires_at = payload["exp"] if "exp" in payload else payload["iat"] + policy.max_age_seconds
    assert decision == PolicyDecision(role=user, read_only=read_only, expires_at=expires_at)
    return decision


def refuse(
    policy: ClaimPolicy,
    payload: dict[str, Any],
    code: Rejection,
    *,
    user: str = "alice",
    database: str | None = "app",
) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        evaluate(policy, payload, user=user, database=database)
    assert info.value.code is code, info.value
    assert SECRET_MARKER not in str(info.value)
    return info.value


# --- Defaults: the behaviour before policies ------------------------------------------------


def test_default_accepts_minimal_token() -> None:
    decision = evaluate(ClaimPolicy(), claims())
    assert decision == PolicyDecision(role="alice", read_only=False, expires_at=NOW + 300)


@pytest.mark.parametrize("missing", ["exp", "sub"])
def test_default_requires_exp_and_sub(missing: str) -> None:
    refuse(ClaimPolicy(), claims(**{missing: None}), Rejection.CLAIMS)


@pytest.mark.parametrize("aud", ["x", ["x"], [], 5])
def test_default_refuses_any_aud(aud: Any) -> None:
    refuse(ClaimPolicy(), claims(aud=aud), Rejection.AUDIENCE)


def test_ignore_audience() -> None:
    assert evaluate(ClaimPolicy(ignore_audience=True), claims(aud="x")).role == "alice"


def test_default_ignores_iss_and_unknown_claims() -> None:
    accept(ClaimPolicy(), claims(iss="anyone", tenant=1, scope=5, dbs={"a": 1}))


# --- Time claims --------------------------------------------------------------------------


def test_expired_with_leeway() -> None:
    accept(ClaimPolicy(), claims(exp=int(NOW) - 9))
    refuse(ClaimPolicy(), claims(exp=int(NOW) - 10), Rejection.EXPIRED)


def test_nbf_and_iat_in_future() -> None:
    refuse(ClaimPolicy(), claims(nbf=int(NOW) + 11), Rejection.NOT_YET_VALID)
    refuse(ClaimPolicy(), claims(iat=int(NOW) + 11), Rejection.NOT_YET_VALID)
    accept(ClaimPolicy(), claims(nbf=int(NOW) + 9, iat=int(NOW) + 9))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1", True, None, [1], 1e300, 2**60])
def test_time_claim_types(claim: str, value: Any) -> None:
    payload = claims()
    payload[claim] = value
    refuse(ClaimPolicy(), payload, Rejection.CLAIMS)


def test_numeric_date() -> None:
    assert is_numeric_date(0) and is_numeric_date(1.5) and is_numeric_date(2**53)
    assert not any(
        is_numeric_date(v) for v in (True, "1", None, float("nan"), float("inf"), 2**53 + 1)
    )


# --- Issuer ---------------------------------------------------------------------------------


def test_issuer() -> None:
    policy = ClaimPolicy(issuer="https://issuer.example")
    accept(policy, claims(iss="https://issuer.example"))
    for iss in [
        "https://issuer.example/",
        "https://ISSUER.example",
        "",
        ["https://issuer.example"],
    ]:
        refuse(policy, claims(iss=iss), Rejection.ISSUER)
    refuse(policy, claims(), Rejection.ISSUER)


def test_issuer_detail_has_no_token_value() -> None:
    error = refuse(ClaimPolicy(issuer="good"), claims(iss=SECRET_MARKER), Rejection.ISSUER)
    assert "not the configured issuer" in error.detail


# --- Audience -----------------------------------------------------------------------------


@pytest.mark.parametrize("aud", ["db-proxy", ["db-proxy"], ["other", "db-proxy"]])
def test_audience_accepted(aud: Any) -> None:
    accept(ClaimPolicy(audience="db-proxy"), claims(aud=aud))


@pytest.mark.parametrize(
    "aud", [None, "other", ["other"], [], "DB-PROXY", "db-proxy ", ["db-proxy", 5], 5, {"a": 1}]
)
def test_audience_refused(aud: Any) -> None:
    refuse(ClaimPolicy(audience="db-proxy"), claims(aud=aud), Rejection.AUDIENCE)


# --- Role claim ---------------------------------------------------------------------------


def test_role_claim() -> None:
    policy = ClaimPolicy(role_claim="db_role")
    decision = evaluate(policy, claims(sub="user-123", db_role="alice"))
    assert decision.role == "alice"
    refuse(policy, claims(sub="alice"), Rejection.CLAIMS)  # db_role missing
    refuse(policy, claims(db_role="bob"), Rejection.SUBJECT_MISMATCH)
    refuse(policy, claims(db_role=["alice"]), Rejection.CLAIMS)
    # sub still has to be a string when present, even if it is not the role.
    refuse(policy, claims(sub=5, db_role="alice"), Rejection.CLAIMS)


@pytest.mark.parametrize("user", ["bob", "Alice", "alice ", "alice\0", "", "alic"])
def test_role_mismatch(user: str) -> None:
    error = refuse(ClaimPolicy(), claims(), Rejection.SUBJECT_MISMATCH, user=user)
    assert "sub does not equal startup user" in error.detail


def test_role_with_lone_surrogate_never_matches() -> None:
    refuse(ClaimPolicy(), claims(sub="alice\udc80"), Rejection.SUBJECT_MISMATCH, user="alice")
    refuse(ClaimPolicy(), claims(sub="alice\udc80"), Rejection.SUBJECT_MISMATCH, user="alice\udc80")


def test_jti_must_be_a_string() -> None:
    accept(ClaimPolicy(), claims(jti="abc"))
    refuse(ClaimPolicy(), claims(jti=123), Rejection.CLAIMS)


# --- Tenant ---------------------------------------------------------------------------------


def test_tenant() -> None:
    policy = ClaimPolicy(tenant_claim="tid", tenant="acme")
    accept(policy, claims(tid="acme"))
    for tid in [None, "ACME", "acme ", ["acme"], 1, {"acme": True}]:
        refuse(policy, claims(tid=tid), Rejection.TENANT)


# --- Scopes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a b  c", {"a", "b", "c"}),
        ("", set()),
        (["a", "b"], {"a", "b"}),
        ([], set()),
        (["a", ""], {"a"}),
    ],
)
def test_parse_scopes(value: Any, expected: set[str]) -> None:
    assert parse_scopes(value) == expected


@pytest.mark.parametrize("value", [None, 5, ["a", 5], {"a": 1}, [["a"]]])
def test_parse_scopes_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_scopes(value)


@pytest.mark.parametrize("scope", ["db:connect", "openid db:connect", ["db:connect", "x"]])
def test_required_scopes_present(scope: Any) -> None:
    accept(ClaimPolicy(required_scopes=frozenset({"db:connect"})), claims(scope=scope))


@pytest.mark.parametrize("scope", [None, "", "db:connectx", "DB:CONNECT", ["db"], 5, ["a", 1]])
def test_required_scopes_missing(scope: Any) -> None:
    refuse(
        ClaimPolicy(required_scopes=frozenset({"db:connect"})), claims(scope=scope), Rejection.SCOPE
    )


def test_all_required_scopes_needed() -> None:
    policy = ClaimPolicy(required_scopes=frozenset({"a", "b"}))
    accept(policy, claims(scope="b a"))
    error = refuse(policy, claims(scope="a"), Rejection.SCOPE)
    assert "b" in error.detail  # names the configured scope that is missing


def test_scope_claim_name() -> None:
    policy = ClaimPolicy(scope_claim="scp", required_scopes=frozenset({"db"}))
    accept(policy, claims(scp=["db"]))
    refuse(policy, claims(scope="db"), Rejection.SCOPE)


def test_read_only_scope() -> None:
    policy = ClaimPolicy(read_only_scope="db:read")
    assert evaluate(policy, claims(scope="db:read other")).read_only is True
    assert evaluate(policy, claims(scope="other")).read_only is False
    assert evaluate(policy, claims()).read_only is False  # no scope claim: read-write
    assert evaluate(ClaimPolicy(), claims(scope="db:read")).read_only is False
    # A malformed scope claim is refused rather than guessed at.
    refuse(policy, claims(scope=5), Rejection.SCOPE)


def test_read_only_with_required_scopes() -> None:
    policy = ClaimPolicy(required_scopes=frozenset({"db"}), read_only_scope="ro")
    assert evaluate(policy, claims(scope="db ro")).read_only is True
    refuse(policy, claims(scope="ro"), Rejection.SCOPE)


# --- Databases ----------------------------------------------------------------------------


def test_databases_claim() -> None:
    policy = ClaimPolicy(databases_claim="dbs")
    accept(policy, claims(dbs=["app", "other"]), database="app")
    accept(policy, claims(dbs="app"), database="app")
    for value in [["other"], "App", [], "app,other", ["app "], 5, [5], None]:
        refuse(policy, claims(dbs=value), Rejection.DATABASE, database="app")


def test_databases_claim_absent_is_refused() -> None:
    refuse(ClaimPolicy(databases_claim="dbs"), claims(), Rejection.DATABASE)


def test_databases_default_database_is_user() -> None:
    # No database in the startup packet: PostgreSQL connects to the user's name.
    policy = ClaimPolicy(databases_claim="dbs")
    accept(policy, claims(dbs=["alice"]), database=None)
    refuse(policy, claims(dbs=["app"]), Rejection.DATABASE, database=None)


def test_databases_not_checked_when_unset() -> None:
    accept(ClaimPolicy(), claims(), database="anything")


# --- Lifetime and age ---------------------------------------------------------------------


def test_max_lifetime() -> None:
    policy = ClaimPolicy(max_lifetime_seconds=3600)
    accept(policy, claims(iat=int(NOW), exp=int(NOW) + 3600))
    error = refuse(policy, claims(iat=int(NOW), exp=int(NOW) + 3601), Rejection.LIFETIME)
    assert "3601" in error.detail
    refuse(policy, claims(iat=None), Rejection.LIFETIME)


def test_require_exp_false_needs_iat_and_age() -> None:
    policy = ClaimPolicy(require_exp=False, max_age_seconds=600)
    decision = evaluate(policy, claims(exp=None, iat=int(NOW) - 100))
    assert decision.expires_at == NOW - 100 + 600
    refuse(policy, claims(exp=None, iat=int(NOW) - 611), Rejection.EXPIRED)
    accept(policy, claims(exp=None, iat=int(NOW) - 609))  # within the leeway
    refuse(policy, claims(exp=None, iat=None), Rejection.CLAIMS)


def test_require_exp_false_still_checks_exp() -> None:
    policy = ClaimPolicy(require_exp=False, max_age_seconds=600)
    refuse(policy, claims(exp=int(NOW) - 60), Rejection.EXPIRED)
    # With exp, exp decides (max age only bounds tokens without exp).
    decision = evaluate(policy, claims(exp=int(NOW) + 7200, iat=int(NOW) - 3600))
    assert decision.expires_at == NOW + 7200


def test_max_age_with_lifetime_and_no_exp() -> None:
    policy = ClaimPolicy(require_exp=False, max_age_seconds=600, max_lifetime_seconds=60)
    accept(policy, claims(exp=None, iat=int(NOW)))
    refuse(policy, claims(iat=int(NOW), exp=int(NOW) + 61), Rejection.LIFETIME)


# --- Required claims ------------------------------------------------------------------------


def test_required_claims() -> None:
    policy = ClaimPolicy(required_claims=frozenset({"jti", "email"}))
    accept(policy, claims(jti="1", email=""))
    refuse(policy, claims(jti="1"), Rejection.CLAIMS)
    # Any value counts as present, even null.
    payload = claims(jti="1")
    payload["email"] = None
    accept(policy, payload)


def test_required_claims_from_list() -> None:
    policy = ClaimPolicy(required_claims=["a"], required_scopes=("x",))  # type: ignore[arg-type]
    assert policy.required_claims == frozenset({"a"})
    assert policy.required_scopes == frozenset({"x"})


# --- Every rule has its own code --------------------------------------------------------------


def test_each_rule_distinct_code() -> None:
    policy = ClaimPolicy(
        issuer="iss",
        audience="aud",
        tenant_claim="tid",
        tenant="t",
        required_scopes=frozenset({"s"}),
        databases_claim="dbs",
        max_lifetime_seconds=600,
    )
    good = claims(iss="iss", aud="aud", tid="t", scope="s", dbs=["app"])
    accept(policy, good)
    cases = {
        Rejection.ISSUER: {"iss": "x"},
        Rejection.AUDIENCE: {"aud": "x"},
        Rejection.TENANT: {"tid": "x"},
        Rejection.SCOPE: {"scope": "x"},
        Rejection.DATABASE: {"dbs": ["x"]},
        Rejection.LIFETIME: {"exp": int(NOW) + 3600},
        Rejection.SUBJECT_MISMATCH: {"sub": "bob"},
        Rejection.EXPIRED: {"exp": int(NOW) - 60},
        Rejection.NOT_YET_VALID: {"nbf": int(NOW) + 60},
        Rejection.CLAIMS: {"sub": None},
    }
    for code, change in cases.items():
        payload = {**good, **change}
        payload = {k: v for k, v in payload.items() if v is not None}
        refuse(policy, payload, code)


# --- validate() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "setting"),
    [
        (ClaimPolicy(require_exp=False), "max_age_seconds"),
        (ClaimPolicy(tenant_claim="tid"), "tenant"),
        (ClaimPolicy(tenant="acme"), "tenant"),
        (ClaimPolicy(audience="a", ignore_audience=True), "ignore_audience"),
        (ClaimPolicy(issuer=""), "issuer"),
        (ClaimPolicy(audience=" a"), "audience"),
        (ClaimPolicy(role_claim=""), "role_claim"),
        (ClaimPolicy(required_scopes=frozenset({"a b"})), "required_scopes"),
        (ClaimPolicy(required_scopes=frozenset({""})), "required_scopes"),
        (ClaimPolicy(read_only_scope="a b"), "read_only_scope"),
        (ClaimPolicy(required_claims=frozenset({""})), "required_claims"),
        (ClaimPolicy(max_lifetime_seconds=0), "max_lifetime_seconds"),
        (ClaimPolicy(max_lifetime_seconds=float("nan")), "max_lifetime_seconds"),
        (ClaimPolicy(require_exp=False, max_age_seconds=-1), "max_age_seconds"),
    ],
)
def test_validate_refuses(policy: ClaimPolicy, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy.validate()
    # The field's own name: ops.config turns it into the TOKEN__ variable.
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}:")


def test_validate_returns_self() -> None:
    policy = ClaimPolicy(require_exp=False, max_age_seconds=60)
    assert policy.validate() is policy


def test_policy_is_frozen() -> None:
    policy = ClaimPolicy()
    with pytest.raises(AttributeError):
        policy.issuer = "x"  # type: ignore[misc]

"""Warm pools, piece by piece: the signed once-only requests, a waiting slot's
environment, and a slot's sandbox before its claim (no Ray, no hub)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gpuportal.provider import isolation, warmclaim
from gpuportal.provider.warmpool import HIDDEN_HOMES, renice_tree, slot_env

KEY = warmclaim.pool_key("the-hub-secret", "pool-1")
NOW = 1_800_000_000.0


def signed(payload: dict[str, object], key: str = KEY) -> tuple[bytes, str]:
    body = json.dumps(payload).encode()
    return body, warmclaim.sign(key, body)


def fresh(**changes: object) -> dict[str, object]:
    return {"pool": "pool-1", "op": "claim", "claim_id": "c" * 22, "exp": int(NOW) + 30, **changes}


def test_a_fresh_signed_request_is_accepted_once_and_then_refused_as_a_replay() -> None:
    guard = warmclaim.ReplayGuard()
    body, signature = signed(fresh())
    assert warmclaim.verify(KEY, "pool-1", body, signature, guard, now=NOW)["op"] == "claim"
    with pytest.raises(warmclaim.ClaimRefused) as refused:
        warmclaim.verify(KEY, "pool-1", body, signature, guard, now=NOW + 1)
    assert refused.value.status == 409


@pytest.mark.parametrize(
    ("payload", "key", "signature", "status"),
    [
        (fresh(), "another-pools-key", None, 401),  # forged: signed with another key
        (fresh(), KEY, "", 401),  # unsigned
        (fresh(), KEY, "zz", 401),  # garbage signature
        (fresh(pool="pool-2"), KEY, None, 403),  # another pool's request
        (fresh(exp=int(NOW) - 1), KEY, None, 403),  # expired
        (fresh(exp=int(NOW) + 3600), KEY, None, 403),  # dated too far ahead
        (fresh(exp=True), KEY, None, 400),  # a bool is not an expiry
        (fresh(exp=2**63), KEY, None, 403),  # an amount at the type's edge
        (fresh(claim_id="short"), KEY, None, 400),
        (fresh(op="shutdown"), KEY, None, 400),
        (["not", "an", "object"], KEY, None, 400),
    ],
    ids=[
        "forged",
        "unsigned",
        "garbage-signature",
        "other-pool",
        "expired",
        "too-far-ahead",
        "bool-expiry",
        "huge-expiry",
        "short-claim-id",
        "unknown-op",
        "not-an-object",
    ],
)
def test_a_bad_request_is_refused_with_its_status(
    payload: object, key: str, signature: str | None, status: int
) -> None:
    body = json.dumps(payload).encode()
    sig = warmclaim.sign(key, body) if signature is None else signature
    with pytest.raises(warmclaim.ClaimRefused) as refused:
        warmclaim.verify(KEY, "pool-1", body, sig, warmclaim.ReplayGuard(), now=NOW)
    assert refused.value.status == status
    assert "the-hub-secret" not in str(refused.value) and KEY not in str(refused.value)


def test_a_too_large_request_is_refused_before_its_signature_is_checked() -> None:
    body = b"{" + b" " * warmclaim.MAX_BODY + b"}"
    with pytest.raises(warmclaim.ClaimRefused) as refused:
        warmclaim.verify(KEY, "pool-1", body, warmclaim.sign(KEY, body), warmclaim.ReplayGuard())
    assert refused.value.status == 413


def test_each_pool_has_its_own_key_and_the_secret_is_not_derivable_from_it() -> None:
    one, two = warmclaim.pool_key("s", "pool-1"), warmclaim.pool_key("s", "pool-2")
    assert one != two and one != "s" and len(one) == 64
    assert warmclaim.pool_key("other", "pool-1") != one


def test_make_request_round_trips_and_caps_its_lifetime() -> None:
    body, headers = warmclaim.make_request(KEY, "pool-1", "stop", {"slot": "ab"}, ttl=10**6)
    payload = warmclaim.verify(
        KEY, "pool-1", body, headers[warmclaim.SIGNATURE_HEADER], warmclaim.ReplayGuard()
    )
    assert payload["slot"] == "ab"
    assert payload["exp"] - time.time() <= warmclaim.MAX_TTL
    with pytest.raises(ValueError):
        warmclaim.make_request(KEY, "pool-1", "shutdown")


def test_a_waiting_slots_environment_holds_nothing_of_a_user_or_the_node() -> None:
    node = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "JUPYTERHUB_API_TOKEN": "someones-token",
        "JUPYTERHUB_USER": "alice",
        "GPUPORTAL_WARM_KEY": "the-pools-key",
        "RAY_AUTH_TOKEN_PATH": "/secret/ray-auth-token",
        "GPUPORTAL_DB_URL": "postgresql://x:hub-secret@db/portal",
        isolation.ENV_HOMES: "/var/lib/gpuportal/homes",
    }
    env = slot_env(node, Path("/tmp/empty"))
    assert set(env) == {"PATH", "LANG", "HOME", isolation.ENV_HOMES}
    assert env["HOME"] == "/tmp/empty"
    assert "secret" not in repr(env) and "token" not in repr(env).lower()


def test_a_slots_sandbox_binds_no_home_only_the_hidden_homes_folder(tmp_path: Path) -> None:
    homes = tmp_path / "homes"
    command = isolation.sandbox_command(
        ["python", "-V"], None, "/usr/bin/bwrap", hidden_homes=(homes, HIDDEN_HOMES)
    )
    binds = [command[i : i + 3] for i, part in enumerate(command) if part == "--bind"]
    assert binds == [["--bind", str(homes), str(HIDDEN_HOMES)]]
    assert command[command.index("--chdir") + 1] == "/"
    # The homes folder itself is an empty folder of the sandbox until the claim.
    first = command.index(str(homes))
    assert command[first - 1] == "--dir" and first < command.index("--bind")


def test_a_slot_taken_while_starting_is_reniced_with_everything_under_it() -> None:
    """A claim that adopts a slot still importing (at nice 10) raises the slot's whole
    process tree (bubblewrap and the Python under it) to normal priority."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        child = None
        for _ in range(100):  # bounded: the shell starts its child at once
            found = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and (p / "stat").exists() and _ppid(p) == parent.pid
            ]
            if found:
                child = found[0]
                break
            time.sleep(0.02)
        assert child is not None
        renice_tree(parent.pid, 7)
        assert os.getpriority(os.PRIO_PROCESS, parent.pid) == 7
        assert os.getpriority(os.PRIO_PROCESS, child) == 7
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) != 7  # only the tree
        renice_tree(999_999_999, 7)  # a process that is gone is skipped
    finally:
        os.killpg(parent.pid, 9)
        parent.wait(5)


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


@pytest.mark.parametrize("wait", [None, 0, -1, True, "10", float("nan"), float("inf")])
def test_with_no_slot_waiting_a_claim_without_a_sane_wait_is_refused_and_starts_nothing(
    tmp_path: Path, wait: object
) -> None:
    """Only a claim that says how long it may wait (a positive, finite number of
    seconds) gets a slot started for it; any other is refused as before (409)."""
    from gpuportal.provider.warmpool import Pool

    pool = Pool("pool-1", KEY, 0, {isolation.ENV_HOMES: str(tmp_path / "homes")})
    try:
        with pytest.raises(warmclaim.ClaimRefused) as refused:
            pool.claim({"user": "alice", "token": "t", "env": {}, "wait": wait})
        assert refused.value.status == 409
        assert pool.slots == {} and pool._wanted.empty()
    finally:
        pool.close()

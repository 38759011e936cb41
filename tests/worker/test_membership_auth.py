"""Rank membership that cannot be forged (issue 20): store values are signed with the group's
secret, and a process group refuses a member that cannot prove it holds the secret."""

from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import test_ep_engine
import torch.distributed as dist
from test_ep_engine import ENGINE, PROMPTS, plan_doc, requests

from moe_worker.engine import RankConfig, start_rank
from moe_worker.engine.auth import SignedStore, membership_proof, read_key
from moe_worker.engine.steps import WireError
from moe_worker.expertmap import write_plan_files
from moe_worker.launch import GroupFailed, spawn_ranks
from support import DictStore

KEY = b"k" * 32
fp8_ckpt, fp8_ref = test_ep_engine.fp8_ckpt, test_ep_engine.fp8_ref  # the EP tests' model and reference


def test_signed_values_verify_and_forged_ones_read_as_absent():
    raw = DictStore()
    host = SignedStore(raw, KEY, create_session=True)
    peer = SignedStore(raw, KEY)
    host.set("join/3", "7:abc")
    assert peer.check(["join/3"]) and peer.get("join/3") == b"7:abc"
    raw.set("join/3", b"7:abc")  # an impostor's value: no MAC
    assert not peer.check(["join/3"])
    with pytest.raises(WireError, match="not signed with the group's secret"):
        peer.get("join/3")
    # A MAC made with another key, or for another key name, or moved between stores, fails too.
    SignedStore(raw, b"x" * 32).set("join/3", "7:abc")
    assert not peer.check(["join/3"])
    host.set("admit/1", "x")
    raw.set("admit/2", raw.get("admit/1"))
    assert not peer.check(["admit/2"])
    other = DictStore()
    SignedStore(other, KEY, create_session=True)
    other.set("admit/1", raw.get("admit/1"))
    assert not SignedStore(other, KEY).check(["admit/1"])  # another session: no replay
    # Without a secret nothing is signed or checked (local runs).
    plain = SignedStore(DictStore(), None)
    plain.set("a", "1")
    assert plain.raw.get("a") == b"1" and plain.get("a") == b"1"


def test_the_key_file_is_checked(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError, match="MOE_RANK_KEY_FILE .*short: the key has 3 bytes, at least 16"):
        read_key(str(tmp_path / "short"))
    with pytest.raises(ValueError, match="MOE_RANK_KEY_FILE .*missing"):
        read_key(str(tmp_path / "missing"))
    (tmp_path / "key").write_bytes(KEY + b"\n")
    assert read_key(str(tmp_path / "key")) == KEY
    assert membership_proof(KEY, "s", "pg", (0, 1), 0) != membership_proof(KEY, "s", "pg", (0, 1), 1)


# ---- a group with an impostor on the store -------------------------------------------------------


def _impostor(port: int, stop: threading.Event, wrote: list) -> None:
    """A process without the secret on the rendezvous address: it forges every kind of key the
    ranks act on, once each (with values a rank would otherwise act on)."""
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=10))
    forged = {"broken/0": "rank 0: no heartbeat from ranks [2]", "reform/0": '{"epoch": 1, "generation": 1, '
              '"world": 4, "lost": [3]}', "alive/0/1": "1", "join/2": "1:0", "admit/3": '{"generation": 1, '
              '"digest": "0", "epoch": 1, "world": 4}', "hb/2": "ffffffffffff:1", "failed": "forged start failure"}
    for k, v in forged.items():
        if stop.is_set():
            return
        store.set(k, v)
        wrote.append(k)
        time.sleep(0.05)


def _auth_rank(rank: int, world: int, port: int, ckpt: str, plan: str, key: bytes) -> dict | None:
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=ENGINE,
                    rank_key=key)
    r = start_rank(rc)
    if r.engine is None:
        r.run()
        return None
    eng = r.engine
    stop, wrote = threading.Event(), []
    t = threading.Thread(target=_impostor, args=(port, stop, wrote), daemon=True)
    try:
        first = [eng._wait(x, 120).output_ids for x in [eng.submit(q) for q in requests("a")]]
        t.start()
        second = [eng._wait(x, 120).output_ids for x in [eng.submit(q) for q in requests("b")]]
        t.join(30)
        time.sleep(2 * eng.cfg.idle_heartbeat_s)  # idle steps after the forgeries: still one group
        third = [eng._wait(x, 120).output_ids for x in [eng.submit(q) for q in requests("c")]]
        return {"outputs": [first, second, third], "wrote": wrote, "recoveries": list(eng.recoveries),
                "resizes": list(eng.resizes), "failed": eng.failure}
    finally:
        stop.set()
        eng.shutdown()


def test_an_impostor_on_the_store_is_ignored_and_the_group_keeps_serving(fp8_ckpt, fp8_ref, tmp_path):
    plan = write_plan_files(tmp_path / "plan", plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(4, _auth_rank, (str(fp8_ckpt), str(plan), os.urandom(32)), timeout_s=300)
    want = [fp8_ref.gen[p][0] for p in PROMPTS]
    assert out["outputs"] == [want] * 3
    assert len(out["wrote"]) == 7 and out["recoveries"] == [] and out["resizes"] == [] and out["failed"] is None


def _keyed_rank(rank: int, world: int, port: int, ckpt: str, plan: str) -> None:
    # Rank 1 has another secret: it can read nothing rank 0 signed (it waits), and rank 0 cannot
    # read its "loaded" mark; without the store checks, the group's proof would refuse it.
    key = KEY if rank != 1 else b"z" * 32
    cfg = ENGINE.__class__(**{**ENGINE.__dict__, "rendezvous_timeout_s": 8.0})
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=cfg,
                    rank_key=key)
    start_rank(rc)


def test_a_rank_without_the_groups_secret_cannot_join(fp8_ckpt, tmp_path):
    plan = write_plan_files(tmp_path / "plan", plan_doc(2, replicas=False, shift=0), 1)
    with pytest.raises(GroupFailed) as info:
        spawn_ranks(2, _keyed_rank, (str(fp8_ckpt), str(plan)), timeout_s=120)
    errors = info.value.errors
    assert "rank 0 publishing the expert map not done within 8 s" in errors[1]
    assert "loading on every rank not done within 8 s (waiting for ['loaded/1'])" in errors[0]


def test_a_process_in_a_ranks_place_fails_the_membership_proof(fp8_ckpt, tmp_path):
    # The store checks passed (say it copied signed values), but it joined the process group's
    # rendezvous without the secret: the proof all-gather refuses it.
    from moe_worker.engine import membership as m

    plan = write_plan_files(tmp_path / "plan", plan_doc(2, replicas=False, shift=0), 1)
    with pytest.raises(GroupFailed) as info:
        spawn_ranks(2, _proof_rank, (str(fp8_ckpt), str(plan)), timeout_s=120)
    assert any("does not hold the group's secret; refusing to serve with it" in e for e in info.value.errors.values())
    assert m.membership_proof is membership_proof


def _proof_rank(rank: int, world: int, port: int, ckpt: str, plan: str) -> None:
    from moe_worker.engine import membership as m

    if rank == 1:  # it signs the store with the secret but proves membership with another
        m.membership_proof = lambda key, *a: membership_proof(b"z" * 32, *a)
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=ENGINE,
                    rank_key=KEY)
    start_rank(rc)

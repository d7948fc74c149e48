"""A node's warm pool: server processes started before anyone asks, claimed at spawn.

The hub's spawner submits one pool per node as a long-running Ray job (pinned
to the node by its ``gpuportal/node:<id>`` resource, holding no GPU: warm slots
are idle capacity, never a reservation). The pool:

- keeps ``GPUPORTAL_WARM_SLOTS`` unclaimed slots (``provider/warmslot.py``), each
  a process that has imported everything a user server imports, started from a
  clean environment, one at a time and at low priority;
- listens on the node's address (``GPUPORTAL_SINGLEUSER_IP``) for requests signed
  with its own key (``provider/warmclaim.py``): ``/claim`` hands a free slot the
  user, token, environment, GPUs and arguments of one server and answers its
  port; ``/stop`` ends a claimed server; ``/status`` counts the slots;
- when no slot is waiting, a claim takes one that is still starting (raised to
  normal priority), or starts one for itself at once: a cold start on this node
  without a Ray job (no job supervisor to start), as fast as a local server;
- replaces a claimed slot in the background, and stops every slot and server it
  started when its job is stopped (or its node dies: each slot dies with it);
- makes Ray count a claimed server's GPUs as used on this node for as long as the
  server lives (``RayGpus``): a placement group per server, made as a driver of
  its own cluster, so Ray's accounting agrees with the marketplace's.

The key arrives in the job's env and is removed from the pool's own env before
any slot starts; slots never hold it. It says where it listens on its job log,
where the spawner (which holds the cluster's Ray token) reads it.

Node-side code: it never imports ``gpuportal.hub``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpuportal.provider import isolation, warmclaim
from gpuportal.provider.ports import free_port
from gpuportal.provider.rayresources import NODE_RESOURCE_PREFIX
from gpuportal.provider.warmslot import ENV_HIDDEN_HOMES, ENV_URGENT

ENV_KEY = "GPUPORTAL_WARM_KEY"
ENV_POOL = "GPUPORTAL_WARM_POOL"
ENV_SLOTS = "GPUPORTAL_WARM_SLOTS"
ENV_IP = "GPUPORTAL_SINGLEUSER_IP"
#: The line on the job's log that tells the spawner where the pool listens.
LISTENING = "gpuportal-warmpool: listening on port "
#: Where a sandboxed slot sees the homes folder until its claim (then it is unmounted).
HIDDEN_HOMES = Path("/run/gpuportal-homes")
#: Most slots one pool keeps waiting, whatever it is asked for.
MAX_SLOTS = 16
#: Seconds a claimed slot may take to take on its user and answer its port.
CLAIM_TIMEOUT = 20.0
#: Most seconds a claim waits for a slot that is still starting (one started for it,
#: or one that was still importing); the hub sends its own, shorter bound.
START_TIMEOUT = 60.0
#: What a slot's environment may hold before its claim: how to run Python, nothing of a user.
SLOT_ENV_ALLOW = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Seconds a claimed server's GPUs wait for the pool's own connection to Ray.
RAY_CONNECT_TIMEOUT = 120.0
#: Seconds Ray may take to place a claimed server's GPUs before the pool gives up on
#: Ray's count (a cold server's job that has just stopped may still hold them).
RAY_PLACE_TIMEOUT = 30.0
#: What of its node's resource a placement group takes: a sliver, as the pool job does.
NODE_RESOURCE_SLIVER = 0.001


def _say(message: str) -> None:
    print(f"gpuportal-warmpool: {message}", file=sys.stderr, flush=True)


@dataclass
class Slot:
    id: str
    proc: subprocess.Popen[bytes]
    state: str = "starting"  # starting → ready → claimed → gone
    port: int = 0
    answers: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    gpus: GpuHold | None = None  # Ray's count of a claimed server's GPUs


def gpu_count(gpus: object) -> int:
    """How many GPUs a claim's ``gpus`` names (comma-joined indices, as in
    ``CUDA_VISIBLE_DEVICES``; empty for none)."""
    if not isinstance(gpus, str):
        return 0
    return sum(1 for part in gpus.split(",") if part.strip())


@dataclass
class GpuHold:
    """One claimed server's GPUs in Ray's count: its placement group, once made."""

    label: str
    count: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    group: Any = None
    ended: bool = False


class RayGpus:
    """Makes Ray count a claimed server's GPUs as used on this node while it lives.

    The pool job holds no GPU (a waiting slot is idle capacity, never a
    reservation), so on its own Ray would show a claimed server's GPUs free while
    the marketplace has them reserved. For each claimed server with N GPUs the
    pool, a driver of its own cluster, makes a placement group of one bundle,
    ``{"GPU": N, "gpuportal/node:<id>": a sliver}``: it pins the count to this node
    and runs nothing. It is removed when the server ends; Ray removes it by itself
    when the pool's job ends (a placement group that is not detached lives with the
    job that made it).

    Ray counts; it does not choose: the server sees the marketplace's indices in
    ``CUDA_VISIBLE_DEVICES``. The marketplace is the authority: when Ray cannot
    place the group (it counts those GPUs busy), the pool says so on its log and
    keeps the server.

    The connection is the pool's alone: slots start from an allow-listed
    environment (no ``RAY_*``) with ``close_fds``, so neither the cluster's address,
    its token nor a socket of the driver reaches a slot or a server.
    """

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.gave_up = threading.Event()
        self._make: Any = None  # ray.util.placement_group, once connected
        self._remove_group: Any = None  # ray.util.remove_placement_group
        self._pin = ""

    def connect(self) -> None:
        """Connect as a driver (Ray sets ``RAY_ADDRESS`` for a job's entrypoint).

        Called once at pool start, in its own thread, so that a claim never waits for
        Ray's import or handshake. Not the main thread: Ray then leaves the pool's
        signal handlers alone."""
        try:
            import ray
            from ray.util import placement_group, remove_placement_group

            ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
            here = ray.get_runtime_context().get_node_id()
            resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == here)
            pins = sorted(r for r in resources if r.startswith(NODE_RESOURCE_PREFIX))
            # A node without gpuportal's resource (not one the spawner pins to): its address.
            pins = pins or sorted(
                r for r in resources if r.startswith("node:") and "__internal" not in r
            )
            if not pins:
                raise RuntimeError("this node declares no resource to pin to")
        except Exception as exc:  # any failure only means Ray counts nothing
            _say(
                "Ray will not count claimed servers' GPUs: no connection to the cluster "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            )
            self.gave_up.set()
            return
        self._make, self._remove_group = placement_group, remove_placement_group
        self._pin = pins[0]
        self.connected.set()
        _say(f"connected to Ray; claimed servers' GPUs are held on {self._pin}")

    def hold(self, label: str, count: int) -> GpuHold | None:
        """Start holding ``count`` GPUs for a claimed server; returns at once."""
        if count <= 0:
            return None
        held = GpuHold(label, count)
        threading.Thread(target=self._place, args=(held,), daemon=True).start()
        return held

    def _place(self, held: GpuHold) -> None:
        deadline = time.monotonic() + RAY_CONNECT_TIMEOUT
        while not self.connected.wait(0.5):
            if self.gave_up.is_set() or time.monotonic() > deadline:
                _say(f"slot {held.label}: Ray does not count its {held.count} GPU(s)")
                return
        bundle = {"GPU": float(held.count), self._pin: NODE_RESOURCE_SLIVER}
        try:
            with held.lock:
                if held.ended:
                    return
                held.group = self._make(
                    [bundle], strategy="STRICT_PACK", name=f"gpuportal-warm-{held.label}"
                )
                group = held.group
            placed = group.wait(RAY_PLACE_TIMEOUT)
        except Exception as exc:  # Ray's count is kept as well as it can be
            if not held.ended:
                _say(f"slot {held.label}: Ray's count of its GPUs failed: {type(exc).__name__}")
            placed = False
        with held.lock:
            if held.ended:
                return
            if placed:
                _say(f"slot {held.label}: Ray counts its {held.count} GPU(s) as used")
                return
            group, held.group = held.group, None
        self._remove(group)
        _say(
            f"slot {held.label}: Ray could not place its {held.count} GPU(s) on this node "
            f"within {RAY_PLACE_TIMEOUT:.0f} s (it counts them busy); the server keeps the "
            "GPUs the marketplace reserved; Ray's count of this node disagrees until it ends"
        )

    def release(self, held: GpuHold | None) -> None:
        """Stop holding a server's GPUs (idempotent; the server has ended)."""
        if held is None:
            return
        with held.lock:
            held.ended = True
            group, held.group = held.group, None
        self._remove(group)

    def _remove(self, group: Any) -> None:
        if group is not None:
            with contextlib.suppress(Exception):
                self._remove_group(group)


def slot_env(source: dict[str, str], home: Path) -> dict[str, str]:
    """A waiting slot's whole environment: Python's path, locale, where homes live."""
    env = {k: v for k, v in source.items() if k in SLOT_ENV_ALLOW}
    bindir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bindir}:/usr/local/bin:/usr/bin:/bin", HOME=str(home))
    homes = source.get(isolation.ENV_HOMES)
    if homes:
        env[isolation.ENV_HOMES] = homes
    return env


class Pool:
    """The slots of one node and the requests that claim and stop them."""

    def __init__(
        self,
        pool_id: str,
        key: str,
        size: int,
        env: dict[str, str],
        bwrap: str | None = None,
        ray_gpus: RayGpus | None = None,
    ) -> None:
        self.pool_id = pool_id
        self.ray_gpus = ray_gpus
        self.key = key
        self.size = max(0, min(size, MAX_SLOTS))
        self.guard = warmclaim.ReplayGuard()
        self.slots: dict[str, Slot] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        #: Claims that found no slot waiting ask the filler thread for one (a slot
        #: must be started by that long-lived thread: see fill_forever).
        self._wanted: queue.Queue[queue.Queue[Slot]] = queue.Queue()
        self._wake = threading.Event()
        self.homes = Path(env.get(isolation.ENV_HOMES) or isolation.default_homes())
        isolation.prepare_homes(self.homes)
        self.bwrap = bwrap
        self._home = Path(tempfile.mkdtemp(prefix="gp-warm-"))  # 0700, empty, root's
        command = [sys.executable, "-m", "gpuportal.provider.warmslot"]
        if bwrap:
            # The sandbox a cold server gets, but for a customer not known yet.
            self._env = slot_env(env, Path("/tmp"))  # noqa: S108 (the sandbox's own tmpfs)
            self._env[ENV_HIDDEN_HOMES] = str(HIDDEN_HOMES)
            command = isolation.sandbox_command(
                command, None, bwrap, hidden_homes=(self.homes, HIDDEN_HOMES)
            )
        else:
            self._env = slot_env(env, self._home)
        self._command = command

    # --- slots ----------------------------------------------------------------
    def _start_slot(self, for_claim: bool = False) -> Slot:
        """Start a slot; ``for_claim``: at normal priority, already claimed."""
        from gpuportal.provider.serverenv import die_with_parent

        env = dict(self._env, **{ENV_URGENT: "1"}) if for_claim else self._env
        proc = subprocess.Popen(
            self._command,
            env=env,
            cwd=self._home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),
        )
        slot = Slot(secrets.token_hex(6), proc, state="claimed" if for_claim else "starting")
        with self.lock:
            self.slots[slot.id] = slot
        threading.Thread(target=self._read, args=(slot,), daemon=True).start()
        return slot

    def _read(self, slot: Slot) -> None:
        assert slot.proc.stdout is not None
        for raw in slot.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict):
                if message.get("ready"):
                    with self.lock:
                        if slot.state == "starting":
                            slot.state = "ready"
                else:
                    slot.answers.put(message)
        slot.proc.wait()
        self._release_gpus(slot)  # a server that ended by itself, too
        with self.lock:
            if slot.state != "claimed":
                slot.state = "gone"
                self.slots.pop(slot.id, None)

    def waiting(self) -> int:
        with self.lock:
            return sum(s.state in ("starting", "ready") for s in self.slots.values())

    def fill_forever(self) -> None:
        """Keep ``size`` slots waiting, starting one at a time (imports are CPU-heavy).

        Runs in one long-lived thread: Linux sends a slot its parent-death signal
        when the *thread* that started it ends. So it also starts the slots that
        claims ask for when none is waiting (``_slot_now``)."""
        while not self.closing.is_set():
            while True:
                try:
                    box = self._wanted.get_nowait()
                except queue.Empty:
                    break
                box.put(self._start_slot(for_claim=True))
            with self.lock:
                starting = any(s.state == "starting" for s in self.slots.values())
            if not starting and self.waiting() < self.size:
                self._start_slot()
            self._wake.wait(0.2)
            self._wake.clear()

    def _slot_now(self) -> Slot:
        """A slot for a claim that found none waiting: one still starting, raised to
        normal priority, else a new one started at once by the filler thread."""
        with self.lock:
            slot = next((s for s in self.slots.values() if s.state == "starting"), None)
            if slot is not None and slot.proc.poll() is None:
                slot.state = "claimed"
        if slot is not None and slot.state == "claimed":
            renice_tree(slot.proc.pid, 0)
            return slot
        if self.closing.is_set():
            raise warmclaim.ClaimRefused(503, "The warm pool is stopping.")
        box: queue.Queue[Slot] = queue.Queue(1)
        self._wanted.put(box)
        self._wake.set()
        try:
            return box.get(timeout=10)
        except queue.Empty:
            raise warmclaim.ClaimRefused(503, "No slot could be started on this node.") from None

    # --- requests ---------------------------------------------------------------
    def claim(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            slot = next(
                (s for s in self.slots.values() if s.state == "ready" and s.proc.poll() is None),
                None,
            )
            if slot is not None:
                slot.state = "claimed"
        wait, started = CLAIM_TIMEOUT, slot is None
        if slot is None:
            # Nothing waiting: start the server now, here, rather than send the hub
            # to a Ray job; bounded by the hub's own wait (it then starts cold).
            asked = request.get("wait")
            if (
                not isinstance(asked, (int, float))
                or isinstance(asked, bool)
                or not math.isfinite(asked)
                or asked <= 0
            ):
                raise warmclaim.ClaimRefused(409, "No warm slot is free on this node.")
            wait = min(float(asked), START_TIMEOUT)
            slot = self._slot_now()
        claim = {k: request.get(k) for k in ("env", "token", "gpus", "args")}
        try:
            user = request.get("user")
            if not isinstance(user, str) or not user:
                raise ValueError("the claim names no user")
            # Outside the sandbox: the slot cannot write /etc/passwd, and must not.
            account = isolation.ensure_account(user, self.homes)
            claim["account"] = {
                "name": account.name,
                "uid": account.uid,
                "gid": account.gid,
                "home": str(account.home),
            }
        except (ValueError, isolation.IsolationError) as exc:
            self._end(slot)
            raise warmclaim.ClaimRefused(400, f"The claim was refused: {exc}") from None
        try:
            assert slot.proc.stdin is not None
            slot.proc.stdin.write((json.dumps(claim) + "\n").encode())
            slot.proc.stdin.flush()
            answer = slot.answers.get(timeout=wait)
        except (OSError, queue.Empty, AssertionError):
            answer = {"error": "the slot did not answer"}
        port = answer.get("port")
        if not isinstance(port, int):
            self._end(slot)
            _say(f"slot {slot.id} failed its claim: {str(answer.get('error'))[:200]}")
            raise warmclaim.ClaimRefused(503, "The warm slot could not take the claim.")
        slot.port = port
        if self.ray_gpus is not None:
            held = self.ray_gpus.hold(slot.id, gpu_count(claim.get("gpus")))
            with self.lock:
                slot.gpus = held
            if slot.proc.poll() is not None:  # it ended before its hold was set
                self._release_gpus(slot)
        _say(f"slot {slot.id} claimed{' as it started' if started else ''}; serving on port {port}")
        return {"slot": slot.id, "port": port, "pid": slot.proc.pid, "started": started}

    def _end(self, slot: Slot, wait: float = 10.0) -> None:
        """End a slot's process (and what it started in its session): TERM, then KILL."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(slot.proc.pid, signal.SIGTERM)
        try:
            slot.proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.proc.pid, signal.SIGKILL)
            slot.proc.wait(5)
        self._release_gpus(slot)
        with self.lock:
            slot.state = "gone"
            self.slots.pop(slot.id, None)

    def _release_gpus(self, slot: Slot) -> None:
        with self.lock:
            held, slot.gpus = slot.gpus, None
        if self.ray_gpus is not None:
            self.ray_gpus.release(held)

    def stop(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            slot = self.slots.get(str(request.get("slot") or ""))
        if slot is None or slot.state != "claimed":
            return {"stopped": False}
        self._end(slot)
        _say(f"slot {slot.id} stopped")
        return {"stopped": True}

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            states = [s.state for s in self.slots.values()]
            ask = str(request.get("slot") or "")
            slot = self.slots.get(ask)
            alive = bool(slot and slot.state == "claimed" and slot.proc.poll() is None)
        return {
            "ready": states.count("ready"),
            "starting": states.count("starting"),
            "claimed": states.count("claimed"),
            "size": self.size,
            **({"slot_alive": alive} if ask else {}),
        }

    def close(self) -> None:
        self.closing.set()
        self._wake.set()
        with self.lock:
            slots = list(self.slots.values())
        for slot in slots:
            self._end(slot, wait=5)


def renice_tree(pid: int, nice: int) -> None:
    """Set the nice value of ``pid`` and of every process under it (a slot in a
    sandbox is bubblewrap's child, in a session of its own); gone ones are skipped."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The field after the parenthesised command name: state, then ppid.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, current, nice)
        todo.extend(parents.get(current, []))


def handler_for(pool: Pool) -> type[BaseHTTPRequestHandler]:
    routes = {"/claim": pool.claim, "/stop": pool.stop, "/status": pool.status}

    class Handler(BaseHTTPRequestHandler):
        server_version = "gpuportal-warmpool"
        sys_version = ""

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            route = routes.get(self.path)
            if route is None:
                self._reply(404, {"message": "Not found."})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= warmclaim.MAX_BODY:
                self._reply(400, {"message": "A signed JSON body is required."})
                return
            body = self.rfile.read(length)
            try:
                request = warmclaim.verify(
                    pool.key,
                    pool.pool_id,
                    body,
                    self.headers.get(warmclaim.SIGNATURE_HEADER, ""),
                    pool.guard,
                )
                if request["op"] != self.path.strip("/"):
                    raise warmclaim.ClaimRefused(400, "The request is for another operation.")
                self._reply(200, route(request))
            except warmclaim.ClaimRefused as exc:
                self._reply(exc.status, {"message": str(exc)})

        def do_GET(self) -> None:
            self._reply(405, {"message": "Requests to a warm pool are signed POSTs."})

        def log_message(self, format: str, *args: Any) -> None:
            return None  # bodies hold tokens; nothing of a request is logged

    return Handler


def main() -> int:
    pool_id = os.environ.get(ENV_POOL, "")
    key = os.environ.pop(ENV_KEY, "")
    if not pool_id or not key:
        _say(f"{ENV_POOL} and {ENV_KEY} must be set (the hub's spawner starts me).")
        return 2
    if os.geteuid() != 0:
        # A slot becomes its customer by dropping root.
        _say("no warm slots on this node: it does not run as root; servers start cold.")
        return 6
    bwrap = isolation.bwrap_path()
    nobody = isolation.Account("nobody", 65534, 65534, Path("/"))
    if bwrap and not isolation.sandbox_works(bwrap, nobody):
        _say("bubblewrap is installed but cannot start a sandbox here; slots run without")
        bwrap = None
    try:
        size = int(os.environ.get(ENV_SLOTS, "1"))
    except ValueError:
        size = 1
    ip = os.environ.get(ENV_IP, "127.0.0.1")
    ray_gpus = RayGpus()
    # Before any slot can be claimed; in the background (Ray's import takes seconds).
    threading.Thread(target=ray_gpus.connect, daemon=True).start()
    pool = Pool(pool_id, key, size, dict(os.environ), bwrap, ray_gpus)
    server = ThreadingHTTPServer((ip, free_port(ip)), handler_for(pool))
    server.daemon_threads = True

    def shut(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, shut)
    filler = threading.Thread(target=pool.fill_forever, daemon=True)
    filler.start()
    print(f"{LISTENING}{server.server_address[1]} ({pool.size} slots)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        pool.close()
        server.server_close()
    _say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

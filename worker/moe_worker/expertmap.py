"""The expert map a rank serves: which ranks host which logical experts, and how it changes.

The operator publishes its plan as PLAN.json (`moe_operator.placement.Plan.to_json`) in a
ConfigMap mounted into every rank pod: `plan.json` (env MOE_EXPERT_MAP) and `generation` next to it.
The worker parses it here, without importing the operator (the worker image may not ship it):

    {"ranks": [{"rank": 0, "node": "n0", "gpu": 0}, ...],
     "expert_map": [[[logical ids on rank r] for r in ranks] for each MoE layer], ...}

Layer i of `expert_map` is the i-th MoE layer (model layer `first_k_dense_replace + i`). A rank may
host several experts of a layer, none, or a replica of an expert another rank also hosts.

Switching generations (`MapSwitcher`), without restarting and never mixing maps in one step:
1. Each rank polls its files at step boundaries. A newer generation is parsed, checked against the
   model and the group size, and the experts this rank newly hosts are read from the checkpoint
   (`Checkpoint.read_expert`: new modules, not yet registered), in a background thread if asked.
   Only then is it *staged*.
2. Every step each rank reports its staged (generation, digest) to rank 0 with its step results.
   When all ranks report the same staged generation, newer than the served one, rank 0 puts
   `switch_to` in the next step plan, and every rank swaps experts and routing tables before it
   runs that step. So all ranks change at the same step boundary.
3. A rank that cannot take a generation (bad JSON, wrong world size, an expert that does not load)
   keeps serving the old map and counts `moe_expert_map_errors_total`; the group then keeps the
   old map too, since it never agrees, until a later generation loads everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_common import plan_json
from moe_common.model_args import ModelArgs

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
GENERATION_FILE = "generation"


class ExpertMapError(ValueError):
    """A PLAN.json that this model and group cannot serve; the message says why."""


@dataclass(frozen=True)
class ExpertMap:
    """Logical experts per rank for every MoE layer, and the node of every rank."""

    generation: int
    """Expert-map generation (the ConfigMap's `generation`); 0 for a built-in default map."""
    nodes: tuple[str, ...]
    """Node name of each rank."""
    moe_layers: tuple[int, ...]
    """Model layer ids of the MoE layers, in the order of `hosts`."""
    hosts: tuple[tuple[tuple[int, ...], ...], ...]
    """[i][r]: sorted logical expert ids rank r hosts in MoE layer `moe_layers[i]`."""
    n_experts: int
    """Logical routed experts per layer."""
    lost: frozenset[int] = frozenset()
    """Ranks of the map that are gone: they host nothing, and the group serves without them
    (`degrade`). Empty for every map the operator publishes."""
    digest: str = ""
    """sha256 of the canonical map (ranks' nodes and hosts, lost ranks): equal digests, equal maps."""
    _replicas: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.digest:
            canon = {"nodes": self.nodes, "layers": self.moe_layers, "hosts": self.hosts}
            if self.lost:
                canon["lost"] = sorted(self.lost)
            object.__setattr__(self, "digest", hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:16])

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @property
    def members(self) -> tuple[int, ...]:
        """The ranks that serve this map (all but the lost ones), ascending."""
        return tuple(r for r in range(self.world_size) if r not in self.lost)

    def node_index(self) -> tuple[int, ...]:
        """Index of each rank's node among the distinct nodes (first-seen order)."""
        order = {n: i for i, n in enumerate(dict.fromkeys(self.nodes))}
        return tuple(order[n] for n in self.nodes)

    def _layer(self, layer_id: int) -> int:
        try:
            return self.moe_layers.index(layer_id)
        except ValueError:
            raise KeyError(f"layer {layer_id} is not an MoE layer of this map") from None

    def owned(self, rank: int) -> dict[int, tuple[int, ...]]:
        """MoE layer id -> logical experts `rank` hosts (the `owned_experts` of its Transformer);
        none for a rank outside the map (one that leaves when the group shrinks)."""
        if rank >= self.world_size:
            return {layer: () for layer in self.moe_layers}
        return {layer: self.hosts[i][rank] for i, layer in enumerate(self.moe_layers)}

    def replicas(self, layer_id: int) -> tuple[tuple[int, ...], ...]:
        """[e]: the ranks hosting logical expert e in `layer_id`, ascending."""
        cached = self._replicas.get(layer_id)
        if cached is None:
            i = self._layer(layer_id)
            on: list[list[int]] = [[] for _ in range(self.n_experts)]
            for r, cell in enumerate(self.hosts[i]):
                for e in cell:
                    on[e].append(r)
            cached = self._replicas[layer_id] = tuple(tuple(x) for x in on)
        return cached

    def candidates(self, rank: int, layer_id: int) -> tuple[tuple[int, ...], ...]:
        """[e]: ranks a token on `rank` may send to for expert e: the replicas on its own node if
        there are any, otherwise all replicas."""
        node = self.nodes[rank]
        out = []
        for reps in self.replicas(layer_id):
            local = tuple(r for r in reps if self.nodes[r] == node)
            out.append(local or reps)
        return tuple(out)

    def route_table(self, rank: int, layer_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cand (E, C) int64 padded with -1, ncand (E,) int64) of `candidates(rank, layer_id)`."""
        cands = self.candidates(rank, layer_id)
        width = max(len(c) for c in cands)
        table = torch.full((self.n_experts, width), -1, dtype=torch.int64)
        for e, c in enumerate(cands):
            table[e, : len(c)] = torch.tensor(c, dtype=torch.int64)
        n = torch.tensor([len(c) for c in cands], dtype=torch.int64)
        return table.to(device), n.to(device)

    def changes(self, new: ExpertMap, rank: int) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        """(added, removed): per MoE layer, experts `rank` hosts in `new` but not here, and back."""
        old, nxt = self.owned(rank), new.owned(rank)
        added = {layer: tuple(sorted(set(nxt[layer]) - set(old.get(layer, ())))) for layer in nxt}
        removed = {layer: tuple(sorted(set(old[layer]) - set(nxt.get(layer, ())))) for layer in old}
        return {k: v for k, v in added.items() if v}, {k: v for k, v in removed.items() if v}

    def to_plan_json(self) -> dict[str, Any]:
        """This map as a PLAN.json document (what the operator writes; gpu = index on its node)."""
        seen: dict[str, int] = {}
        ranks = []
        for r, node in enumerate(self.nodes):
            ranks.append({"rank": r, "node": node, "gpu": seen.get(node, 0)})
            seen[node] = seen.get(node, 0) + 1
        return {"ranks": ranks, "expert_map": [[list(c) for c in layer] for layer in self.hosts], "metrics": {}}


def degrade(emap: ExpertMap, lost: Iterable[int]) -> ExpertMap:
    """The map a group serves after losing ranks `lost` (and those `emap` already lost): the same
    generation, the lost ranks hosting nothing, and every expert that only they hosted moved to
    one survivor. Fewest moves: experts with a surviving copy stay where they are (the group only
    loses that copy) and each orphaned expert is read by exactly one survivor, one that does not
    host it yet (one copy per GPU). Survivors are chosen by fewest experts in the layer, then
    fewest experts added so far, then rank, so the reads spread over the group.

    A pure function of (`emap`, `lost`): every survivor computes the same map by itself.
    """
    gone = frozenset(lost) | emap.lost
    W = emap.world_size
    if bad := sorted(r for r in gone if not 0 <= r < W):
        raise ExpertMapError(f"lost ranks {bad} are not ranks of the map (0..{W - 1})")
    survivors = [r for r in range(W) if r not in gone]
    if not survivors:
        raise ExpertMapError(f"every rank of the map is lost ({sorted(gone)})")
    added = dict.fromkeys(survivors, 0)
    hosts = []
    for cells_in in emap.hosts:
        cells = [[] if r in gone else list(c) for r, c in enumerate(cells_in)]
        hosted = {e for c in cells for e in c}
        orphans = sorted({e for r in gone for e in cells_in[r]} - hosted)
        for e in orphans:
            r = min(survivors, key=lambda r: (len(cells[r]), added[r], r))
            cells[r].append(e)
            added[r] += 1
        hosts.append(tuple(tuple(sorted(c)) for c in cells))
    return ExpertMap(emap.generation, emap.nodes, emap.moe_layers, tuple(hosts), emap.n_experts, lost=gone)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def parse_plan(doc: Mapping[str, Any] | str | bytes, args: ModelArgs, world_size: int | None,
               generation: int) -> ExpertMap:
    """Read a PLAN.json document (dict or text) for a model and a group of `world_size` ranks
    (None: as many as the plan lists, for a group that can grow and shrink).

    The structure is PLAN.json's (`moe_common.plan_json`); on top, what serving needs: the
    group's number of ranks, one list per MoE layer, ids in range, and every logical expert hosted somewhere in every
    layer (a token routed to an unhosted expert could not be served). Duplicates in one rank's
    list (EPLB packing can produce them) count once; ranks hosting nothing are allowed.
    """
    try:
        plan = plan_json.loads(doc)
    except plan_json.PlanFormatError as e:
        raise ExpertMapError(str(e)) from None
    if world_size is None and plan.ranks:
        world_size = len(plan.ranks)
    if len(plan.ranks) != world_size:
        raise ExpertMapError(f"plan has {len(plan.ranks)} ranks, the EP group has {world_size}")
    nodes = [r.node for r in plan.ranks]
    moe_layers = tuple(args.moe_layers)
    if len(plan.expert_map) != len(moe_layers):
        raise ExpertMapError(f"plan expert_map has {len(plan.expert_map)} layers, the model has {len(moe_layers)} "
                             "MoE layers")
    E = args.n_routed_experts
    hosts = []
    for li, layer in enumerate(plan.expert_map):
        cells = []
        for r, cell in enumerate(layer):
            bad = [e for e in cell if not 0 <= e < E]
            if bad:
                raise ExpertMapError(f"plan expert_map layer {li} rank {r}: expert ids {bad} outside 0..{E - 1}")
            cells.append(tuple(sorted(set(cell))))
        hosted = {e for c in cells for e in c}
        if len(hosted) != E:
            missing = sorted(set(range(E)) - hosted)
            raise ExpertMapError(f"plan expert_map layer {li} hosts no replica of experts {missing[:8]}")
        hosts.append(tuple(cells))
    return ExpertMap(int(generation), tuple(nodes), moe_layers, tuple(hosts), E)


def default_map(args: ModelArgs, world_size: int, *, gpus_per_node: int = 8, generation: int = 0) -> ExpertMap:
    """The map a group uses without a PLAN.json: ranks on nodes of `gpus_per_node`.

    world_size >= E: rank r hosts expert r mod E (ranks E.. hold replicas of experts 0..);
    world_size < E: contiguous blocks of ceil/floor(E / world_size) experts per rank.
    """
    E = args.n_routed_experts
    if world_size < 1:
        raise ExpertMapError(f"world size must be >= 1, got {world_size}")
    if world_size >= E:
        cells = tuple((r % E,) for r in range(world_size))
    else:
        bounds = [E * r // world_size for r in range(world_size + 1)]
        cells = tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(world_size))
    nodes = tuple(f"node-{r // gpus_per_node}" for r in range(world_size))
    layers = tuple(args.moe_layers)
    return ExpertMap(generation, nodes, layers, tuple(cells for _ in layers), E)


def read_plan_files(plan_path: str | Path) -> tuple[int | None, str]:
    """(generation, PLAN.json text) from `plan_path` and the `generation` file next to it.

    A ConfigMap volume swaps both files at once (a symlinked directory); the generation is read
    before and after the plan so a swap in between is noticed (ExpertMapError: retry later).
    Without a generation file: the plan document's optional "generation", else None.
    """
    plan_path = Path(plan_path)
    gen_path = plan_path.with_name(GENERATION_FILE)

    def gen() -> int | None:
        try:
            text = gen_path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ExpertMapError(f"{gen_path}: {e}") from None
        try:
            return int(text)
        except ValueError:
            raise ExpertMapError(f"{gen_path}: generation must be an integer, got {text!r}") from None

    before = gen()
    try:
        text = plan_path.read_text()
    except OSError as e:
        raise ExpertMapError(f"{plan_path}: {e}") from None
    after = gen()
    if before != after:
        raise ExpertMapError(f"{plan_path}: changed while being read (generation {before} -> {after})")
    if after is None:
        try:
            g = json.loads(text).get("generation")
        except (json.JSONDecodeError, AttributeError):
            g = None
        after = g if isinstance(g, int) and not isinstance(g, bool) else None
    return after, text


def write_plan_files(directory: str | Path, emap_or_doc: ExpertMap | Mapping[str, Any], generation: int) -> Path:
    """Write plan.json and generation into `directory` (atomically each, plan first), as the
    ConfigMap volume would present them; returns the plan path. For tests and local runs."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = emap_or_doc.to_plan_json() if isinstance(emap_or_doc, ExpertMap) else dict(emap_or_doc)
    for name, text in ((PLAN_FILE, json.dumps(doc) + "\n"), (GENERATION_FILE, f"{generation}\n")):
        tmp = d / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(d / name)
    return d / PLAN_FILE


# ---------------------------------------------------------------------------------------------
# Switching
# ---------------------------------------------------------------------------------------------

MAX_ERRORS = 100
"""Expert-map errors a rank (and rank 0 for its group) keeps; older ones are in the log."""

LoadedExperts = dict[int, dict[int, Any]]
"""MoE layer id -> expert id -> module read for the new map (not registered yet)."""


@dataclass
class Staged:
    """A generation this rank has fully prepared: the map and the experts it newly hosts."""

    emap: ExpertMap
    experts: LoadedExperts


class MapSwitcher:
    """One rank's view of the expert-map generations: served, staged, failed.

    `poll()` at a step boundary (main thread); `staged_key()` goes into the step reply;
    `take(generation)` when the step plan says so. `load_experts(added)` reads the experts this
    rank newly hosts (layer -> ids) and returns layer -> id -> module; it runs in a background
    thread when `background` is set, so serving continues while weights load.
    """

    def __init__(
        self,
        current: ExpertMap,
        rank: int,
        args: ModelArgs,
        *,
        plan_path: str | Path | None,
        load_experts: Callable[[dict[int, tuple[int, ...]]], LoadedExperts],
        poll_interval_s: float = 1.0,
        background: bool = True,
        on_error: Callable[[str], None] | None = None,
        resizable: bool = False,
    ):
        self.current = current
        self.full = current
        """The published map of the served generation (`current` without its lost ranks)."""
        self.resizable = resizable
        """Accept generations with a different number of ranks (the engine regroups for them)."""
        self.rank = rank
        self.args = args
        self.plan_path = Path(plan_path) if plan_path else None
        self.load_experts = load_experts
        self.poll_interval_s = poll_interval_s
        self.background = background
        self.on_error = on_error
        self.staged: Staged | None = None
        self.failed: set[int] = set()
        """Generations this rank could not take (never retried; a newer one may succeed)."""
        self.errors: deque[str] = deque(maxlen=MAX_ERRORS)
        """The latest errors (a bounded window; each distinct error of the files is reported once)."""
        self._file_error: str | None = None  # the error the plan files gave at the last poll
        self._last_poll = float("-inf")
        self._loading: int | None = None  # generation being loaded in the background
        self._ready: Staged | BaseException | None = None  # written by the loader thread
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- step boundary ----

    def poll(self, force: bool = False) -> None:
        """Notice a newer generation in the files; promote a finished background load to staged."""
        self._collect()
        now = time.monotonic()
        if self.plan_path is None or (not force and now - self._last_poll < self.poll_interval_s):
            return
        self._last_poll = now
        try:
            gen, text = read_plan_files(self.plan_path)
        except ExpertMapError as e:
            if "changed while being read" in str(e):
                return  # mid-swap: the next poll reads a consistent pair
            self._file_fault(str(e))
            return
        if gen is not None and gen < self.current.generation:
            self._file_fault(f"{self.plan_path}: generation {gen} is older than the generation this rank serves; "
                             "ignored (generations must only grow)")
            return
        self._file_error = None
        if gen is None:
            return  # no generation: nothing to order it by; the first map stays
        newest = self.staged.emap.generation if self.staged is not None else self.current.generation
        if gen <= newest or gen in self.failed or gen == self._loading:
            return
        self.offer(text, gen)

    def _file_fault(self, message: str) -> None:
        """Report what is wrong with the plan files once, not at every poll, until it changes."""
        if message != self._file_error:
            self._file_error = message
            self._fail(None, message)

    def offer(self, plan: Mapping[str, Any] | str, generation: int) -> None:
        """Prepare `plan` as `generation` (parse, then load new experts, maybe in the background)."""
        try:
            emap = parse_plan(plan, self.args, None if self.resizable else self.current.world_size, generation)
        except ExpertMapError as e:
            self._fail(generation, str(e))
            return
        if self._loading is not None:  # a newer generation supersedes the one loading
            log.info("rank %d: generation %d supersedes %d while loading", self.rank, generation, self._loading)
        added = self._to_load(emap)
        self._loading = generation
        if self.background:
            self._thread = threading.Thread(
                target=self._load, args=(emap, added), name=f"expert-map-{generation}", daemon=True
            )
            self._thread.start()
        else:
            self._load(emap, added)
            self._collect()

    def _to_load(self, emap: ExpertMap) -> dict[int, tuple[int, ...]]:
        """Experts `emap` assigns to this rank that it may not hold when the switch comes. The
        group may take the staged generation while this one loads, so the rank may then serve
        either map: load what `emap` needs beyond the experts both of them hold."""
        held = self.current.owned(self.rank)
        if self.staged is not None:
            also = self.staged.emap.owned(self.rank)
            held = {layer: tuple(sorted(set(ids) & set(also.get(layer, ())))) for layer, ids in held.items()}
        need = emap.owned(self.rank)
        added = {layer: tuple(sorted(set(ids) - set(held.get(layer, ())))) for layer, ids in need.items()}
        return {layer: ids for layer, ids in added.items() if ids}

    def _load(self, emap: ExpertMap, added: dict[int, tuple[int, ...]]) -> None:
        try:
            with torch.inference_mode():
                experts = self.load_experts(added) if added else {}
            result: Staged | BaseException = Staged(emap, experts)
        except Exception as e:  # any failure to load keeps the old map; reported, not raised
            result = e
        with self._lock:
            if self._loading == emap.generation:
                self._ready = result
                if isinstance(result, BaseException):
                    result.generation = emap.generation  # type: ignore[attr-defined]

    def _collect(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None:
            return
        self._loading = None
        if isinstance(ready, BaseException):
            gen = getattr(ready, "generation", None)
            self._fail(gen, f"loading experts failed: {type(ready).__name__}: {ready}")
            return
        self.staged = ready

    def _fail(self, generation: int | None, message: str) -> None:
        msg = f"rank {self.rank}: expert map generation {generation}: {message}; keeping generation {self.current.generation}"
        log.error(msg)
        self.errors.append(msg)
        if generation is not None:
            self.failed.add(generation)
            if self._loading == generation:
                self._loading = None
        if self.on_error is not None:
            self.on_error(msg)

    def staged_key(self) -> tuple[int, str]:
        """(generation, digest) this rank could switch to now: the staged one, else the served one."""
        m = self.staged.emap if self.staged is not None else self.current
        return m.generation, m.digest

    def take(self, generation: int) -> Staged:
        """The staged generation, now served; or, when the served map has lost ranks and
        `generation` is its own, the published map again (the lost ranks are back; nothing was
        loaded for it: the switch reads what is missing). Raises otherwise (a protocol bug)."""
        if self.staged is not None and self.staged.emap.generation == generation:
            staged, self.staged = self.staged, None
        elif self.current.lost and generation == self.full.generation:
            staged = Staged(self.full, {})
        else:
            have = self.staged.emap.generation if self.staged else None
            raise RuntimeError(f"rank {self.rank}: told to switch to generation {generation}, staged {have}")
        self.current = self.full = staged.emap
        return staged

    def lose(self, lost: frozenset[int]) -> Staged:
        """Serve the served map `degrade`d by ranks `lost` from now on (a second loss moves only
        what it orphans); what to hold, as `take` returns it (nothing loaded yet)."""
        self.current = degrade(self.current, lost)
        return Staged(self.current, {})

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for a background load to finish (tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._collect()


def agreed_switch(current: int, keys: Sequence[tuple[int, str]]) -> int | None:
    """Rank 0's rule: switch to generation g when every rank has staged the same (g, digest), g newer."""
    if not keys:
        return None
    first = keys[0]
    if first[0] > current and all(k == first for k in keys):
        return first[0]
    return None


__all__ = [
    "ExpertMap",
    "ExpertMapError",
    "MapSwitcher",
    "Staged",
    "agreed_switch",
    "default_map",
    "degrade",
    "parse_plan",
    "read_plan_files",
    "write_plan_files",
]

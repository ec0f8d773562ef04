"""The residency view: which models each backend holds, pure and bounded.

Per backend: its model slots and concurrency (``shape``), and per model it holds a
``Resident``: *pending* (a request for it was placed there, to be loaded, and waits in the
router), *loading* (such a request reached the backend: the load is under way) or *loaded*,
with when a request for it last reached the backend and how many requests for it wait in the
router (``queued``) or run there (``running``). Models a backend does not hold are *absent*.

Two sources, the backend's word first:

* ``report(backend, loaded, loading)``: what the backend says it holds (a heartbeat, KServe
  ``RepositoryIndex``). It replaces the view of that backend, except that a model the router
  has requests in flight for stays (as loading): the backend may not have reached them yet.
  ``confirm(backend, model, ready)`` is the same for one model (KServe ``ModelReady``).
  ``report_use(backend, use)``: each model's requests at the backend now, from every router
  (a heartbeat's ``model_use``). What is not this router's own (the count less its own
  requests sent there, never below 0) is kept per backend and model as *foreign* until the
  next such report: the load of the other routers sharing the backend, which this one does
  not see otherwise. A model with foreign requests is spared like one with requests of its
  own (``victim``).
* ``routed`` / ``started`` / ``finished``: the router's own decisions between reports. The
  backend is modelled as ``backends.modelsim`` behaves (an LRU cache whose bookkeeping happens
  when a request reaches it): a request reaching it touches its model, and one for a model it
  lacks makes it load that model, making room by evicting its least recently used model with
  no request running there (``started`` returns it); a model with requests running is never
  evicted, so the backend goes over its slots instead, and its next load evicts as many as
  bring it back under them. A pending model takes no slot.

Bounds: at most ``max_backends`` backends (the least recently touched is forgotten past it)
and, per backend, at most ``max(slots, max_models)`` models (a report listing more keeps the
first ones) and ``max_models`` foreign counts. So memory is bounded whatever backends
report or clients ask for.

No clock of its own: every call takes ``now``. No I/O, no asyncio.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

PENDING: Literal["pending"] = "pending"
LOADING: Literal["loading"] = "loading"
LOADED: Literal["loaded"] = "loaded"
State = Literal["pending", "loading", "loaded"]


@dataclass(slots=True)
class Resident:
    """One model on one backend."""

    state: State
    since: float  # when it became resident (its load began, or a report first showed it)
    last_used: float  # when a request for it last reached the backend
    queued: int = 0  # requests for it placed there, not sent yet (waiting in the router)
    running: int = 0  # requests for it sent there and not answered yet

    @property
    def inflight(self) -> int:
        return self.queued + self.running

    @property
    def in_slot(self) -> bool:
        """Whether it takes a slot at the backend (a pending model is not there yet)."""
        return self.state != PENDING


@dataclass(slots=True)
class Shape:
    slots: int
    concurrency: int
    explicit: bool = False  # the router loads and unloads its models (Triton's explicit mode)


class _Backend:
    __slots__ = ("foreign", "foreign_total", "models", "occupied", "reported_at", "shape")

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.models: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self.occupied = 0  # models that take a slot (not pending): kept by set, _put, _drop
        self.reported_at: float | None = None
        # model -> other routers' requests there (the last report_use); only counts > 0
        self.foreign: dict[str, int] = {}
        self.foreign_total = 0

    def set(self, resident: Resident, state: State) -> None:
        """Every change of a resident's state goes through here (``occupied`` follows)."""
        self.occupied += (state != PENDING) - resident.in_slot
        resident.state = state


class ResidencyView:
    def __init__(
        self, default_slots: int = 4, default_concurrency: int = 1, *,
        max_backends: int = 4096, max_models: int = 1024,
    ) -> None:
        if min(default_slots, default_concurrency, max_backends, max_models) < 1:
            raise ValueError("slots, concurrency and the bounds must be >= 1")
        self.default = Shape(default_slots, default_concurrency)
        self.max_backends = max_backends
        self.max_models = max_models
        self._backends: OrderedDict[str, _Backend] = OrderedDict()
        # model -> backend id -> its Resident: the holders of a model in one lookup.
        self._holders: dict[str, dict[str, Resident]] = {}
        self.forgotten = 0  # backends dropped past max_backends

    # -- what backends are -------------------------------------------------------------------

    def shape(self, backend: str, slots: int | None = None, concurrency: int | None = None,
              explicit: bool | None = None) -> Shape:
        """Set (each one given) and return a backend's slots, concurrency and model
        control."""
        record = self._backend(backend)
        if slots is not None:
            record.shape.slots = max(1, slots)
        if concurrency is not None:
            record.shape.concurrency = max(1, concurrency)
        if explicit is not None:
            record.shape.explicit = explicit
        return record.shape

    def shape_of(self, backend: str) -> Shape:
        record = self._backends.get(backend)
        return record.shape if record is not None else self.default

    def forget(self, backend: str) -> None:
        """A backend left: drop everything known of it."""
        record = self._backends.pop(backend, None)
        if record is not None:
            for model in record.models:
                self._unindex(model, backend)

    # -- what they hold ----------------------------------------------------------------------

    def holders(self, model: str) -> dict[str, Resident]:
        """backend id -> Resident for every backend holding ``model`` (loading or loaded).
        Shared: do not modify it."""
        return self._holders.get(model, _EMPTY)

    def models_of(self, backend: str) -> OrderedDict[str, Resident]:
        """The models of ``backend``, least recently used first. Shared: do not modify."""
        record = self._backends.get(backend)
        return record.models if record is not None else OrderedDict()

    def get(self, backend: str, model: str) -> Resident | None:
        return self._holders.get(model, _EMPTY).get(backend)

    def victim(self, backend: str, *, spare_queued: bool = False) -> tuple[str, Resident] | None:
        """The model ``backend`` would evict to load another: its least recently used loaded
        model with no request running there, once its slots are full; None while a slot is
        free or when every model is in use. One with other routers' requests there (foreign)
        goes only when no other may, as the backend evicts a model nobody uses first.
        ``spare_queued`` (a load the router plans, which should not cost anyone's requests
        a reload): nor one with requests waiting for it in the router, nor a foreign one."""
        record = self._backends.get(backend)
        if record is None or record.occupied < record.shape.slots:
            return None
        waited: tuple[str, Resident] | None = None  # the first with only foreign use
        for name, resident in record.models.items():
            if resident.state != LOADED or resident.running or (spare_queued and resident.queued):
                continue
            if name not in record.foreign:
                return name, resident
            if waited is None:
                waited = name, resident
        return None if spare_queued else waited

    def foreign(self, backend: str, model: str) -> int:
        """Other routers' requests for ``model`` at ``backend`` (its last ``report_use``)."""
        record = self._backends.get(backend)
        return record.foreign.get(model, 0) if record is not None else 0

    def foreign_load(self, backend: str) -> int:
        """Other routers' requests at ``backend``, every model (its last ``report_use``)."""
        record = self._backends.get(backend)
        return record.foreign_total if record is not None else 0

    def occupied(self, backend: str) -> int:
        """Slots its models take (a pending model takes none yet)."""
        record = self._backends.get(backend)
        return record.occupied if record is not None else 0

    def free_slot(self, backend: str) -> bool:
        record = self._backends.get(backend)
        return record is None or record.occupied < record.shape.slots

    # -- the router's own decisions ----------------------------------------------------------

    def routed(self, backend: str, model: str, now: float) -> None:
        """A request for ``model`` is placed on ``backend`` (it may wait in the router): the
        model is pending there if it was absent."""
        record = self._backend(backend)
        resident = record.models.get(model)
        if resident is None:
            resident = Resident(PENDING, now, now)
            self._put(record, backend, model, resident)
        resident.queued += 1

    def started(self, backend: str, model: str, now: float) -> tuple[str, ...]:
        """That request reaches the backend: its model is used now, and loads if it was
        pending there. Returns the models the load evicts, least recently used first."""
        record = self._backends.get(backend)
        resident = record.models.get(model) if record is not None else None
        if record is None or resident is None:
            return ()
        resident.queued = max(0, resident.queued - 1)
        resident.running += 1
        resident.last_used = now
        record.models.move_to_end(model)
        if resident.state != PENDING:
            return ()
        # The backend's own rule: only running models are kept, and a load brings it back
        # under its slots (after a spell over them) as far as models are free to go.
        evicted: list[str] = []
        while (found := self.victim(backend)) is not None:
            self._drop(record, backend, found[0])
            evicted.append(found[0])
        record.set(resident, LOADING)
        resident.since = now
        return tuple(evicted)

    def finished(self, backend: str, model: str, now: float, *, served: bool,
                 started: bool = True) -> None:
        """A request placed there for ``model`` is over: ``served`` (answered by the
        backend: the model is loaded now) or not (failed, or taken back before it was sent:
        a pending or loading model nobody else waits for is forgotten). ``started``: it had
        reached the backend."""
        record = self._backends.get(backend)
        resident = record.models.get(model) if record is not None else None
        if record is None or resident is None:
            return
        if started:
            resident.running = max(0, resident.running - 1)
        else:
            resident.queued = max(0, resident.queued - 1)
        if served:
            record.set(resident, LOADED)
            resident.last_used = now
        elif resident.state != LOADED and not resident.inflight:
            self._drop(record, backend, model)

    # -- the backend's word ------------------------------------------------------------------

    def report(self, backend: str, loaded: Iterable[str], now: float,
               loading: Iterable[str] = (), *, lru_order: bool = False) -> None:
        """What ``backend`` says it holds now; models with requests placed there stay.
        ``lru_order``: the models are listed least recently used first, the order the
        backend evicts in, which the view takes (other routers' requests reorder them too,
        unseen here); those kept for requests on their way come after them."""
        record = self._backend(backend)
        record.reported_at = now
        said: dict[str, State] = {}
        pairs: tuple[tuple[State, Iterable[str]], ...] = ((LOADED, loaded), (LOADING, loading))
        for told, names in pairs:
            for name in names:
                if len(said) >= max(record.shape.slots, self.max_models):
                    break
                said.setdefault(name, told)
        for name, resident in list(record.models.items()):
            if name in said:
                continue
            if not resident.inflight:
                self._drop(record, backend, name)
            else:  # not there (yet, or any more), but requests are on their way to it
                record.set(resident, LOADING if resident.running else PENDING)
        for name, state in said.items():
            held = record.models.get(name)
            if held is None:
                self._put(record, backend, name, Resident(state, now, now))
            else:
                record.set(held, state)
        if lru_order:
            for name in [*(n for n in said if n in record.models),
                         *(n for n in record.models if n not in said)]:
                record.models.move_to_end(name)

    def report_use(self, backend: str, use: Mapping[str, int], now: float) -> None:
        """What ``backend`` says each model's requests there are now, from every router
        (models left out have none): the counts less this router's own requests sent there
        are the other routers', kept until the next report. Requests this router has not
        sent yet are not at the backend, so only its running ones are its share. A model
        with requests there is used now, whoever sent them: its last use moves, so the
        churn guard and the age ranking of where to load see other routers' uses too."""
        record = self._backend(backend)
        foreign: dict[str, int] = {}
        for name, count in use.items():
            if len(foreign) >= self.max_models:
                break
            resident = record.models.get(name)
            if resident is not None and count > 0:
                resident.last_used = max(resident.last_used, now)
            extra = count - (resident.running if resident is not None else 0)
            if extra > 0:
                foreign[name] = extra
        record.foreign = foreign
        record.foreign_total = sum(foreign.values())

    def confirm(self, backend: str, model: str, ready: bool, now: float) -> None:
        """What ``backend`` says of one model (KServe ``ModelReady``): loaded (``ready``), or
        not there, which a model with requests placed there survives, as in ``report``."""
        record = self._backend(backend)
        resident = record.models.get(model)
        if ready:
            if resident is None:
                self._put(record, backend, model, Resident(LOADED, now, now))
            else:
                record.set(resident, LOADED)
        elif resident is not None:
            if not resident.inflight:
                self._drop(record, backend, model)
            else:
                record.set(resident, LOADING if resident.running else PENDING)

    # -- views -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        return iter(self._backends)

    def models(self) -> dict[str, dict[str, Resident]]:
        """model -> its holders, for every model some backend holds."""
        return self._holders

    def statistics(self) -> dict[str, Any]:
        return {
            "backends": len(self._backends),
            "models": len(self._holders),
            "residents": sum(len(b.models) for b in self._backends.values()),
            "forgotten": self.forgotten,
        }

    def __repr__(self) -> str:
        return (f"ResidencyView(backends={len(self._backends)}, models={len(self._holders)}, "
                f"default={self.default})")

    # -- bookkeeping -------------------------------------------------------------------------

    def _backend(self, backend: str) -> _Backend:
        record = self._backends.get(backend)
        if record is None:
            if len(self._backends) >= self.max_backends:
                oldest = next(iter(self._backends))
                self.forget(oldest)
                self.forgotten += 1
            record = self._backends[backend] = _Backend(
                Shape(self.default.slots, self.default.concurrency))
        else:
            self._backends.move_to_end(backend)
        return record

    def _put(self, record: _Backend, backend: str, model: str, resident: Resident) -> None:
        if len(record.models) >= max(record.shape.slots, self.max_models):
            self._drop(record, backend, next(iter(record.models)))  # the bound, past any slots
        record.models[model] = resident
        record.occupied += resident.in_slot
        self._holders.setdefault(model, {})[backend] = resident

    def _drop(self, record: _Backend, backend: str, model: str) -> None:
        record.occupied -= record.models.pop(model).in_slot
        self._unindex(model, backend)

    def _unindex(self, model: str, backend: str) -> None:
        holders = self._holders.get(model)
        if holders is not None:
            holders.pop(backend, None)
            if not holders:
                del self._holders[model]


_EMPTY: dict[str, Resident] = {}

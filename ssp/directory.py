# -*- test-case-name: tests.test_directory -*-
"""
The Spine Directory Service (SDS): where the proxy learns which accredited
systems exist, what they may send, and where each provider's endpoints are.

Three L{IDirectory} implementations live here:

  - L{LDIFDirectory}: an SDS LDIF export held in memory, for demos and small
    deployments that take a nightly SDS extract.
  - L{LDAPDirectory}: live SDS over LDAP(S) with ldap3, on a dedicated
    thread pool (never the reactor's own, which also resolves upstream host
    names), with failover across several SDS servers.
  - L{CachingDirectory}: a cache in front of either, with single-flight,
    negative caching and bounded stale-if-error.

All three apply SDS matching rules the same way, in Python, whatever the
server did: ASIDs and interaction IDs compare exactly, party keys ignoring
case.  A misconfigured LDAP schema can therefore widen nothing.
"""

from __future__ import annotations

import base64
import math
import queue
import ssl
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs
from ldap3 import (
    AUTO_BIND_NO_TLS,
    AUTO_BIND_TLS_BEFORE_BIND,
    FIRST,
    NONE,
    ROUND_ROBIN,
    SAFE_SYNC,
    SUBTREE,
    Connection,
    Server,
    ServerPool,
    Tls,
    set_config_parameter,
)
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ssp.config import ConfigError, DirectoryConfig
from ssp.errors import DirectoryUnavailable
from ssp.interfaces import IDirectory
from ssp.model import AccreditedSystem, MessageHandler

log = Logger()

#: Attributes read from C{nhsAs} and C{nhsMhs} entries.
AS_ATTRIBUTES = ("uniqueIdentifier", "nhsIDCode", "nhsMHSPartyKey", "nhsAsSvcIA", "nhsProductName")
MHS_ATTRIBUTES = (
    "uniqueIdentifier",
    "nhsIDCode",
    "nhsMHSPartyKey",
    "nhsMhsSvcIA",
    "nhsMHSEndPoint",
    "nhsMhsFQDN",
    "nhsMhsCPAId",
)

#: An entry's attributes: lower-cased names to lists of values.
Attributes = dict[str, list[str]]

# LDAP result codes that mean "no such entry" rather than "SDS failed".
_SUCCESS = 0
_NO_SUCH_OBJECT = 32
# A party key has one MHS record per interaction: a few dozen at most.
_SIZE_LIMIT = 1000
#: At most this many interaction IDs are remembered as known (for metric
#: labels); SDS registers a few hundred.
MAX_KNOWN_INTERACTIONS = 10_000


def _interactions_of(value: Any) -> Iterator[str]:
    """
    The interaction IDs an answer of an L{IDirectory} lookup names.
    """
    if isinstance(value, AccreditedSystem):
        yield from value.interactions
    elif isinstance(value, tuple):
        for handler in value:
            yield handler.interaction


def _first(attributes: Attributes, name: str) -> str:
    values = attributes.get(name.lower())
    return values[0] if values else ""


def _object_classes(attributes: Attributes) -> set[str]:
    return {v.lower() for v in attributes.get("objectclass", [])}


def system_from(attributes: Attributes) -> AccreditedSystem | None:
    """
    The L{AccreditedSystem} an C{nhsAs} entry describes, or L{None} when it
    has no ASID.
    """
    asid = _first(attributes, "uniqueIdentifier")
    if not asid:
        return None
    return AccreditedSystem(
        asid=asid,
        ods_code=_first(attributes, "nhsIDCode"),
        party_key=_first(attributes, "nhsMHSPartyKey"),
        interactions=frozenset(attributes.get("nhsassvcia", [])),
        product_name=_first(attributes, "nhsProductName"),
    )


def handlers_from(attributes: Attributes) -> list[MessageHandler]:
    """
    The L{MessageHandler}s an C{nhsMhs} entry describes: one per
    C{nhsMhsEndPoint} value (the attribute is multi-valued in the schema,
    single-valued in practice); none when it lacks a party key, an
    interaction or an endpoint.
    """
    party_key = _first(attributes, "nhsMHSPartyKey")
    interaction = _first(attributes, "nhsMhsSvcIA")
    if not party_key or not interaction:
        return []
    return [
        MessageHandler(
            party_key=party_key,
            interaction=interaction,
            endpoint=endpoint,
            fqdn=_first(attributes, "nhsMhsFQDN"),
            cpa_id=_first(attributes, "nhsMhsCPAId"),
            ods_code=_first(attributes, "nhsIDCode"),
        )
        for endpoint in attributes.get("nhsmhsendpoint", [])
        if endpoint
    ]


def _ldif_records(text: str) -> Iterator[Attributes]:
    """
    The entries of an LDIF document (RFC 2849 content records): folded
    lines joined, comments dropped, C{::} values base64-decoded.
    """
    logical: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") and logical:
            logical[-1] += line[1:]
        else:
            logical.append(line)
    record: Attributes = {}
    for line in [*logical, ""]:
        if not line.strip():
            if "dn" in record and "changetype" not in record:
                yield record
            record = {}
            continue
        if line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        if value.startswith(":"):
            value = base64.b64decode(value[1:].strip()).decode("utf-8")
        elif value.startswith("<"):
            continue  # values by URL reference are not used by SDS exports
        else:
            value = value.lstrip(" ")
        record.setdefault(name.strip().lower(), []).append(value)


def parse_ldif(text: str) -> tuple[list[AccreditedSystem], list[MessageHandler]]:
    """
    Read the C{nhsAs} and C{nhsMhs} entries of an SDS LDIF export.

    Attribute and object class names are case-insensitive, as in LDAP;
    other entries are ignored.

    @return: C{(systems, handlers)} in file order.
    """
    systems: list[AccreditedSystem] = []
    handlers: list[MessageHandler] = []
    for record in _ldif_records(text):
        classes = _object_classes(record)
        if "nhsas" in classes:
            system = system_from(record)
            if system is not None:
                systems.append(system)
        elif "nhsmhs" in classes:
            handlers.extend(handlers_from(record))
    return systems, handlers


#: Without these an entry is useless to the proxy (see L{system_from},
#: L{handlers_from}); an LDIF missing them is refused before it is served.
REQUIRED_ATTRIBUTES = {
    "nhsas": ("uniqueIdentifier", "nhsIDCode", "nhsMHSPartyKey"),
    "nhsmhs": ("nhsMHSPartyKey", "nhsMhsSvcIA", "nhsMHSEndPoint"),
}


def ldif_problem(text: str) -> str | None:
    """
    What makes C{text} unusable as the proxy's SDS, or L{None}: not an
    LDIF, no C{nhsAs}/C{nhsMhs} entry, or an entry lacking an attribute
    the proxy reads (named with its DN).
    """
    found = 0
    try:
        for record in _ldif_records(text):
            classes = _object_classes(record) & set(REQUIRED_ATTRIBUTES)
            for kind in classes:
                found += 1
                missing = [a for a in REQUIRED_ATTRIBUTES[kind] if not _first(record, a)]
                if missing:
                    return f"entry {record['dn'][0]!r} lacks {', '.join(missing)}"
    except (ValueError, UnicodeDecodeError) as e:
        return f"not an LDIF: {e}"
    if not found:
        return "not an SDS LDIF: no nhsAs or nhsMhs entry"
    return None


def _pick_system(systems: Iterable[AccreditedSystem | None], asid: str) -> AccreditedSystem | None:
    for system in systems:
        if system is not None and system.asid == asid:
            return system
    return None


def _matching(
    handlers: Iterable[MessageHandler], party_key: str, interaction: str | None
) -> tuple[MessageHandler, ...]:
    wanted = party_key.lower()
    return tuple(
        h
        for h in handlers
        if h.party_key.lower() == wanted and (interaction is None or h.interaction == interaction)
    )


@implementer(IDirectory)
class LDIFDirectory:
    """
    An SDS held in memory, loaded from an LDIF export.

    The first C{nhsAs} entry for an ASID wins, as file order is the only
    order an export has.
    """

    reachable = True

    def __init__(self, systems: Iterable[AccreditedSystem], handlers: Iterable[MessageHandler]):
        self._systems: dict[str, AccreditedSystem] = {}
        for system in systems:
            self._systems.setdefault(system.asid, system)
        self._handlers: dict[str, list[MessageHandler]] = {}
        for handler in handlers:
            self._handlers.setdefault(handler.party_key.lower(), []).append(handler)
        self._interactions = frozenset(
            [i for system in self._systems.values() for i in system.interactions]
            + [h.interaction for hs in self._handlers.values() for h in hs]
        )

    @classmethod
    def from_file(cls, path: Path | str) -> LDIFDirectory:
        """
        Load an LDIF file (UTF-8).  Reads the file synchronously: call it at
        start-up or reload, not per request.
        """
        return cls(*parse_ldif(Path(path).read_text(encoding="utf-8")))

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        return succeed(self._systems.get(asid))

    def message_handlers(
        self, party_key: str, interaction: str | None
    ) -> Deferred[tuple[MessageHandler, ...]]:
        return succeed(
            _matching(self._handlers.get(party_key.lower(), ()), party_key, interaction)
        )

    def knows_interaction(self, interaction: str) -> bool:
        return interaction in self._interactions


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def _strings(values: Any) -> list[str]:
    if not isinstance(values, (list, tuple)):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class _SearchFailed(Exception):
    """SDS answered a search with an error result."""


class _Dropped(Exception):
    """The search timed out (or was cancelled) before a thread took it."""


class _QueuedSearch:
    """
    A search waiting for an LDAP thread; the reactor drops it when its
    caller's deadline passes, and the thread then skips it.
    """

    dropped = False

    def drop(self) -> None:
        self.dropped = True


@implementer(IDirectory)
class LDAPDirectory:
    """
    Live SDS over LDAP, LDAPS or LDAP+StartTLS.

    ldap3 blocks, so every search runs on a dedicated L{ThreadPool} of
    C{config.connections} threads, each using one C{SAFE_SYNC} connection
    from a queue of as many.  A connection that breaks is discarded and
    reopened on next use (a reused connection that fails is retried once on
    a fresh one, so a restarted SDS server costs no refusal).  Connections
    are opened through an ldap3 L{ServerPool} over C{config.urls}, which
    fails over to the next server that accepts connections.

    Searches are bounded by C{connect_timeout}, C{receive_timeout} and the
    server-side C{time_limit}; since a thread cannot be cancelled, the
    caller's L{Deferred} also times out, after C{2 * connect_timeout *
    len(urls) + receive_timeout + time_limit} seconds, counted from when
    the search was asked for.  A search still queued when it times out is
    dropped, never run.  At most C{connections} searches run and
    C{max_queued_searches} wait; beyond that a lookup fails at once, so a
    flood of cache misses costs neither a growing queue nor SDS's time.
    Any failure becomes L{DirectoryUnavailable}.

    L{start} and L{stop} run and stop the thread pool (see
    L{directory_from_config} for the service that calls them).

    @ivar searches: how many LDAP searches were started, for tests and
        metrics.
    @ivar refused: how many lookups were refused at once because every
        connection was busy and the queue full.
    @ivar dropped: how many queued searches were skipped because their
        caller had timed out.
    @ivar reachable: whether the last search reached SDS.
    """

    reachable = True

    def __init__(
        self,
        config: DirectoryConfig,
        reactor: Any,
        client_certificate: tuple[Path, Path] | None = None,
    ):
        """
        @param client_certificate: C{(certificate, private_key)} PEM files
            for TLS client authentication, when SDS demands one.
        """
        if not config.urls:
            raise ConfigError("directory.urls: required when kind = 'ldap'")
        self._config = config
        self._reactor = reactor
        try:
            self._password = _read_password(config.password_file)
        except OSError as e:
            raise ConfigError(f"directory.password_file: cannot read: {e.strerror}") from e
        try:
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(config.ca) if config.ca else None,
                local_certificate_file=str(client_certificate[0]) if client_certificate else None,
                local_private_key_file=str(client_certificate[1]) if client_certificate else None,
            )
        except LDAPException as e:
            raise ConfigError(f"directory.ca: {e}") from e
        # One pass over the servers, then give up at once: ldap3 otherwise
        # sleeps POOLING_LOOP_TIMEOUT (10 s) before raising.
        set_config_parameter("POOLING_LOOP_TIMEOUT", 0)
        self._servers = ServerPool(
            [
                Server(url, get_info=NONE, connect_timeout=config.connect_timeout, tls=tls)
                for url in config.urls
            ],
            FIRST if config.pool_strategy == "first" else ROUND_ROBIN,
            active=1,
            exhaust=False,
            single_state=False,
        )
        self._threads = ThreadPool(
            minthreads=config.connections, maxthreads=config.connections, name="ssp-ldap"
        )
        self._idle: queue.Queue[Connection | None] = queue.Queue()
        for _ in range(config.connections):
            self._idle.put(None)
        # Availability probe and connect per server, then one search.
        self._deadline = (
            2 * config.connect_timeout * len(config.urls)
            + math.ceil(config.receive_timeout)
            + config.time_limit
        )
        self._capacity = config.connections + config.max_queued_searches
        self._pending = 0
        self._saturated = False
        self.searches = 0
        self.refused = 0
        self.dropped = 0

    def start(self) -> None:
        """
        Start the LDAP threads.
        """
        self._threads.start()

    def stop(self) -> None:
        """
        Stop the LDAP threads (waiting for searches in progress, which are
        bounded by the timeouts) and unbind every connection.
        """
        self._threads.stop()
        while not self._idle.empty():
            connection = self._idle.get()
            if connection is not None:
                _close(connection)

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        if not asid:
            return succeed(None)
        d = self._lookup(
            f"(&(objectClass=nhsAs)(uniqueIdentifier={escape_filter_chars(asid)}))",
            AS_ATTRIBUTES,
        )
        d.addCallback(lambda entries: _pick_system(map(system_from, entries), asid))
        return d

    def message_handlers(
        self, party_key: str, interaction: str | None
    ) -> Deferred[tuple[MessageHandler, ...]]:
        if not party_key or interaction == "":
            return succeed(())
        terms = f"(objectClass=nhsMhs)(nhsMHSPartyKey={escape_filter_chars(party_key)})"
        if interaction is not None:
            terms += f"(nhsMhsSvcIA={escape_filter_chars(interaction)})"
        d = self._lookup(f"(&{terms})", MHS_ATTRIBUTES)
        d.addCallback(
            lambda entries: _matching(
                [h for e in entries for h in handlers_from(e)], party_key, interaction
            )
        )
        return d

    def knows_interaction(self, interaction: str) -> bool:
        """
        Nothing is remembered here: L{CachingDirectory} does.
        """
        return False

    def _lookup(self, search_filter: str, attributes: Iterable[str]) -> Deferred[list[Attributes]]:
        if self._pending >= self._capacity:
            self.refused += 1
            if not self._saturated:
                log.warn("SDS searches saturated ({pending} running or queued): refusing "
                         "lookups that miss the cache", pending=self._pending)
            self._saturated = True
            return fail(DirectoryUnavailable())
        self._saturated = False
        self.searches += 1
        self._pending += 1
        search = _QueuedSearch()
        d: Deferred[list[Attributes]] = Deferred(lambda _: search.drop())

        def finished(succeeded: bool, result: Any) -> None:
            self._pending -= 1
            if not succeeded and result.check(_Dropped):
                self.dropped += 1
            if not d.called:
                (d.callback if succeeded else d.errback)(result)

        self._threads.callInThreadWithCallback(
            lambda succeeded, result: self._reactor.callFromThread(finished, succeeded, result),
            self._search, search, search_filter, list(attributes),
        )
        d.addTimeout(self._deadline, self._reactor)
        d.addCallbacks(self._reached, self._unavailable, errbackArgs=(search_filter,))
        return d

    def _reached(self, found: list[Attributes]) -> list[Attributes]:
        self.reachable = True
        return found

    def _unavailable(self, failure: Failure, search_filter: str) -> Failure:
        self.reachable = False
        log.warn(
            "SDS search {filter} failed: {error}",
            filter=search_filter,
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        return Failure(DirectoryUnavailable())

    def _search(self, search: _QueuedSearch, search_filter: str,
                attributes: list[str]) -> list[Attributes]:
        """
        Run one search on a pooled connection, unless its caller gave up
        while it was queued.  Runs in an LDAP thread.
        """
        if search.dropped:
            raise _Dropped()
        connection = self._idle.get()
        try:
            if connection is not None and not connection.closed:
                try:
                    return self._query(connection, search_filter, attributes)
                except _SearchFailed:
                    raise
                except Exception:
                    # Probably went stale (server restarted, idle timeout).
                    _close(connection)
            connection = None
            connection = self._connect()
            return self._query(connection, search_filter, attributes)
        except _SearchFailed:
            raise  # SDS answered: the connection itself is fine
        except BaseException:
            if connection is not None:
                _close(connection)
                connection = None
            raise
        finally:
            self._idle.put(connection)

    def _connect(self) -> Connection:
        config = self._config
        return Connection(
            self._servers,
            user=config.bind_dn,
            password=self._password,
            client_strategy=SAFE_SYNC,
            auto_bind=AUTO_BIND_TLS_BEFORE_BIND if config.start_tls else AUTO_BIND_NO_TLS,
            # ldap3 packs it into SO_RCVTIMEO as whole seconds.
            receive_timeout=math.ceil(config.receive_timeout),
            read_only=True,
            raise_exceptions=False,
        )

    def _query(
        self, connection: Connection, search_filter: str, attributes: list[str]
    ) -> list[Attributes]:
        _, result, response, _ = connection.search(
            self._config.base,
            search_filter,
            search_scope=SUBTREE,
            attributes=attributes,
            time_limit=self._config.time_limit,
            size_limit=_SIZE_LIMIT,
        )
        if not result:
            raise ConnectionError("no response from SDS")
        code = result.get("result")
        if code == _NO_SUCH_OBJECT:
            return []
        if code != _SUCCESS:
            raise _SearchFailed(f"{code} {result.get('description', '')}")
        entries = [
            (
                entry.get("dn", ""),
                {name.lower(): _strings(values) for name, values in entry["attributes"].items()},
            )
            for entry in response or ()
            if entry.get("type") == "searchResEntry"
        ]
        return [attributes for _, attributes in sorted(entries, key=lambda e: e[0])]


def _close(connection: Connection) -> None:
    try:
        connection.unbind()
    except Exception:
        pass


@attrs.frozen
class _Entry:
    value: Any
    stored: float
    lifetime: float


@implementer(IDirectory)
class CachingDirectory:
    """
    A cache in front of another L{IDirectory}.

      - Answers are fresh for C{ttl} seconds; empty answers (unknown ASID,
        no handler) for C{negative_ttl}.
      - Single-flight: concurrent identical lookups share one query to the
        directory behind; each caller still gets its own L{Deferred}, so
        cancelling one caller cancels nobody else.
      - Stale-if-error: when the directory behind fails with
        L{DirectoryUnavailable}, an entry up to C{stale_limit} seconds past
        its freshness is served instead; beyond that the failure
        propagates, and the proxy answers 503 (fail closed).
      - At most C{max_entries} answers and, apart from them,
        C{max_negative} empty ones, each dropped least recently used first
        in constant time: random ASIDs cannot grow the cache, nor evict
        the systems that are really in use.

    Three monotonic counters are public for metrics:

    @ivar hits: lookups answered from a fresh entry.
    @ivar misses: lookups that needed (or joined) a query to the directory
        behind, whatever its outcome.
    @ivar stale_served: lookups answered from a stale entry because the
        directory behind failed (each is also a miss).
    """

    def __init__(
        self,
        directory: IDirectory,
        clock: IReactorTime,
        ttl: float,
        negative_ttl: float,
        stale_limit: float,
        max_entries: int = 100_000,
        max_negative: int = 10_000,
    ):
        self._directory = directory
        self._clock = clock
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_limit = stale_limit
        self._positive = _LRU(max_entries)
        self._negative = _LRU(max_negative)
        self._interactions: set[str] = set()
        self._waiting: dict[tuple[Any, ...], list[Deferred[Any]]] = {}
        self.hits = 0
        self.misses = 0
        self.stale_served = 0

    @property
    def reachable(self) -> bool:
        return bool(self._directory.reachable)

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        return self._get(("accredited_system", asid), self._directory.accredited_system, asid)

    def message_handlers(
        self, party_key: str, interaction: str | None
    ) -> Deferred[tuple[MessageHandler, ...]]:
        return self._get(
            ("message_handlers", party_key, interaction),
            self._directory.message_handlers,
            party_key,
            interaction,
        )

    def knows_interaction(self, interaction: str) -> bool:
        """
        Whether an answer this cache stored named the interaction.
        """
        return interaction in self._interactions

    @property
    def size(self) -> int:
        """
        How many answers are cached, positive and negative.  (Not
        C{__len__}: an empty cache must still be a true value.)
        """
        return len(self._positive) + len(self._negative)

    def _entry(self, key: tuple[Any, ...]) -> _Entry | None:
        return self._positive.get(key) or self._negative.get(key)

    def _get(self, key: tuple[Any, ...], lookup: Callable[..., Any], *args: Any) -> Deferred[Any]:
        entry = self._entry(key)
        if entry is not None and self._clock.seconds() - entry.stored < entry.lifetime:
            self.hits += 1
            return succeed(entry.value)
        self.misses += 1

        waiters = self._waiting.get(key)
        first = waiters is None
        if waiters is None:
            waiters = self._waiting[key] = []

        def forget(d: Deferred[Any]) -> None:
            # A cancelled caller just stops waiting; the query goes on for
            # the others and for the cache.
            if d in waiters:
                waiters.remove(d)

        mine: Deferred[Any] = Deferred(forget)
        waiters.append(mine)
        if first:
            maybeDeferred(lookup, *args).addBoth(self._settle, key)
        return mine

    def _settle(self, result: Any, key: tuple[Any, ...]) -> None:
        waiters = self._waiting.pop(key)
        now = self._clock.seconds()
        if isinstance(result, Failure):
            entry = self._entry(key)
            if (
                result.check(DirectoryUnavailable)
                and entry is not None
                and now - entry.stored <= entry.lifetime + self._stale_limit
            ):
                log.warn(
                    "SDS unavailable: serving {key} cached {age:.0f}s ago",
                    key=key,
                    age=now - entry.stored,
                )
                self.stale_served += len(waiters)
                result = entry.value
        else:
            self._store(key, result, now)
        for d in list(waiters):
            if d.called:
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _store(self, key: tuple[Any, ...], value: Any, now: float) -> None:
        if value:
            self._negative.pop(key)
            self._positive.put(key, _Entry(value, now, self._ttl))
            if len(self._interactions) < MAX_KNOWN_INTERACTIONS:
                self._interactions.update(_interactions_of(value))
        else:
            self._positive.pop(key)
            self._negative.put(key, _Entry(value, now, self._negative_ttl))


class _LRU:
    """
    At most C{size} entries; reading one makes it the most recently used,
    and storing one more drops the least recently used.  Every operation
    is O(1).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[Any, ...], entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def pop(self, key: tuple[Any, ...]) -> None:
        self._entries.pop(key, None)


class _LDAPService(Service):
    """
    Runs an L{LDAPDirectory}'s thread pool while the service runs.
    """

    def __init__(self, directory: LDAPDirectory):
        self._directory = directory

    def startService(self) -> None:
        super().startService()
        self._directory.start()

    def stopService(self) -> None:
        super().stopService()
        self._directory.stop()


def directory_from_config(
    config: DirectoryConfig,
    clock: IReactorTime,
    reactor: Any,
    client_certificate: tuple[Path, Path] | None = None,
) -> tuple[IDirectory, IService]:
    """
    Build the directory the C{[directory]} section describes.

    C{kind = "ldif"} gives an L{LDIFDirectory} (loaded now; it needs no
    cache).  C{kind = "ldap"} gives a L{CachingDirectory} in front of an
    L{LDAPDirectory}.

    @param client_certificate: see L{LDAPDirectory}.
    @return: the directory, and a service whose C{startService} and
        C{stopService} start and stop its threads (a no-op service for
        LDIF): add it to the proxy's service tree, or call both yourself.
    """
    if config.kind == "ldif":
        if config.ldif is None:
            raise ConfigError("directory.ldif: required when kind = 'ldif'")
        try:
            return LDIFDirectory.from_file(config.ldif), Service()
        except OSError as e:
            raise ConfigError(f"directory.ldif: cannot read {config.ldif}: {e.strerror}") from e
    ldap = LDAPDirectory(config, reactor, client_certificate)
    cached = CachingDirectory(
        ldap,
        clock,
        ttl=config.cache_ttl,
        negative_ttl=config.negative_ttl,
        stale_limit=config.stale_limit,
        max_entries=config.cache_entries,
        max_negative=config.negative_entries,
    )
    return cached, _LDAPService(ldap)

"""etcd (v3 API) as the arbiter, through its JSON gateway, from trio.

Test-and-set on a key is ONE etcd transaction::

    compare:  create_revision(KEY) == 0          (nobody holds the key)
    success:  put KEY = candidate                (we won)
    failure:  range KEY                          (who won: compare with ourselves)

so a candidate that asks again after losing the reply to its own winning
request reads itself as the winner, and is told it won. Every request is
linearizable (etcd's default): a member cut off from its quorum cannot answer,
which is the arbiter's absence, as for the built-in server (nobody goes live).

Keys live under :data:`KEY_PREFIX` (``ftproxy/<pair>/generation/<N>``); the
values are the candidates' names. HTTP goes through ``httpx`` on trio; every
call is bounded by :class:`~arbiter.ArbiterTiming`, and a failed endpoint is
followed by the next one, starting with the one that answered last. A refusal
that etcd answers (credentials, permissions) holds for the whole cluster; a TLS
refusal only for that member, so the others are asked before giving up.
"""

from __future__ import annotations

import base64
import functools
import ssl
from collections.abc import Sequence
from typing import Any, Final

import httpx
import structlog
import trio

from arbiter._interface import ArbiterRefused, ArbiterTiming, ArbiterUnavailable
from arbiter._protocol import Decision, Undecided

__all__ = ["KEY_PREFIX", "EtcdArbiter"]

KEY_PREFIX: Final = "ftproxy/"

# gRPC status codes that etcd's gateway passes on: the ones that mean "not now".
_UNAVAILABLE_CODES: Final = frozenset({1, 4, 8, 10, 13, 14})  # cancelled, deadline, ...
_INVALID_TOKEN: Final = "invalid auth token"
# TLS failures that are a broken connection, not a refusal (a member killed mid-request).
_TRANSIENT_SSL: Final = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)

logger = structlog.get_logger()

Address = tuple[str, int]


class EtcdArbiter:
    """Test-and-set in an etcd cluster reached at ``endpoints`` (any member will do)."""

    def __init__(
        self,
        endpoints: Sequence[Address],
        *,
        display: str,
        tls: ssl.SSLContext | None = None,
        client_certificate: bool = False,
        user: str | None = None,
        password: str | None = None,
        timing: ArbiterTiming | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an etcd arbiter needs at least one endpoint")
        self.endpoints = list(endpoints)
        self._display = display
        self._tls = tls
        self._client_certificate = client_certificate
        # Made once: a context per call would load the system's CAs each time (~40 ms).
        self._verify = tls if tls is not None else _plain_http_context()
        self._user = user
        self._password = password
        self.timing = timing or ArbiterTiming()
        self._preferred = 0  # the endpoint that answered last is asked first
        self._token: str | None = None

    @property
    def kind(self) -> str:
        return "etcd"

    def describe(self) -> str:
        return self._display

    async def test_and_set(self, key: str, candidate: str) -> Decision:
        stored = _b64(KEY_PREFIX + key)
        body = {
            "compare": [
                {"key": stored, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            ],
            "success": [{"request_put": {"key": stored, "value": _b64(candidate)}}],
            "failure": [{"request_range": {"key": stored}}],
        }
        reply = await self._call("/v3/kv/txn", body)
        if reply.get("succeeded"):
            return Decision(key, candidate, True)
        try:
            kvs = reply["responses"][0]["response_range"]["kvs"]
            winner = _unb64(kvs[0]["value"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ArbiterRefused(
                f"etcd at {self._display} answered the test-and-set of {key!r} with neither "
                f"a put nor the key's winner: {str(reply)[:200]}"
            ) from None
        return Decision(key, winner, winner == candidate)

    async def query(self, key: str) -> Decision | Undecided:
        reply = await self._call("/v3/kv/range", {"key": _b64(KEY_PREFIX + key)})
        kvs = reply.get("kvs") or []
        if not kvs:
            return Undecided(key)
        try:
            return Decision(key, _unb64(kvs[0]["value"]), False)
        except (KeyError, TypeError, ValueError):
            raise ArbiterRefused(
                f"etcd at {self._display} answered a read of {key!r} with {str(reply)[:200]}"
            ) from None

    # -- transport ----------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that answers."""
        reasons = []
        refusals: list[_EndpointRefused] = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            endpoint = self.endpoints[index]
            try:
                reply = await self._call_endpoint(endpoint, path, body)
            except ArbiterUnavailable as exc:
                reasons.append(f"{_format(endpoint)}: {exc}")
                continue
            except _EndpointRefused as exc:
                # One member's bad certificate must not stop us asking the others;
                # a refusal etcd itself answers (credentials) stands for all of them.
                refusals.append(exc)
                reasons.append(f"{_format(endpoint)}: refused: {exc}")
                continue
            self._preferred = index
            return reply
        if len(refusals) == count:  # no member will talk to us: asking again will not help
            raise refusals[0]
        raise ArbiterUnavailable(f"no etcd endpoint answered ({'; '.join(reasons)})")

    async def _call_endpoint(
        self, endpoint: Address, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        scheme = "https" if self._tls is not None else "http"
        base = f"{scheme}://{_format(endpoint)}"
        timeout = httpx.Timeout(self.timing.answer_s, connect=self.timing.connect_s)
        client = httpx.AsyncClient(
            verify=self._verify,
            timeout=timeout,
            trust_env=False,  # never through an environment's HTTP proxy
        )
        try:
            with trio.move_on_after(self.timing.answer_s):
                async with client:
                    for fresh_token in (False, True):
                        if self._user is not None and (self._token is None or fresh_token):
                            self._token = await self._authenticate(client, base)
                        try:
                            return await self._post(client, base + path, body)
                        except _TokenExpired:
                            if fresh_token or self._user is None:
                                raise ArbiterRefused(
                                    f"etcd at {base} refuses our authentication token"
                                ) from None
            raise ArbiterUnavailable(f"no answer within {self.timing.answer_s:g} s")
        except httpx.TimeoutException as exc:
            what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "get an answer"
            limit = self.timing.connect_s if what == "connect" else self.timing.answer_s
            raise ArbiterUnavailable(f"could not {what} within {limit:g} s") from None
        except httpx.TransportError as exc:
            problem = _ssl_problem(exc)
            if problem is not None:
                raise _EndpointRefused(
                    f"TLS with etcd at {base} failed: {problem} (check --etcd-ca, "
                    "--etcd-cert and --etcd-key, and that the endpoints speak TLS: etcds://)"
                ) from None
            raise ArbiterUnavailable(self._broken(exc)) from None

    def _broken(self, exc: httpx.TransportError) -> str:
        """Why a connection broke, with what to check when a misconfiguration looks so."""
        reason = str(exc) or type(exc).__name__
        connecting = isinstance(exc, httpx.ConnectError)  # refused, or the handshake failed
        if self._tls is None and isinstance(
            exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
        ):
            # What a member serving TLS does to plain HTTP: it hangs up, which reaches
            # us as a disconnect or, racing our request, as a reset.
            reason += " (if the members serve TLS, write etcds://)"
        elif self._tls is not None and (
            _caused_by(exc, ssl.SSLEOFError)
            or (connecting and _caused_by(exc, ConnectionResetError))
        ):
            # What a member serving plain HTTP does to a TLS handshake: it hangs up,
            # which reaches us as an EOF or, with our hello still unread, as a reset.
            reason += " (closed during the TLS handshake: if the members serve plain HTTP, "
            reason += "write etcd://)"
        elif self._tls is not None and not self._client_certificate and not connecting:
            # Under TLS 1.3 a member refuses a client without a certificate after the
            # handshake: its alert may arrive as a plain reset.
            reason += " (if the members require client certificates: --etcd-cert, --etcd-key)"
        return reason

    async def _authenticate(self, client: httpx.AsyncClient, base: str) -> str:
        reply = await self._post(
            client,
            base + "/v3/auth/authenticate",
            {"name": self._user, "password": self._password or ""},
        )
        token = reply.get("token")
        if not isinstance(token, str) or not token:
            raise ArbiterRefused(
                f"etcd at {base} accepted user {self._user!r} but issued no token "
                "(is authentication enabled? `etcdctl auth enable`)"
            )
        return token

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        headers = {"Authorization": self._token} if self._token else {}
        response = await client.post(url, json=body, headers=headers)
        if response.status_code == 200:
            try:
                answer = response.json()
                if not isinstance(answer, dict):
                    raise ValueError(answer)
                return answer
            except ValueError:
                raise ArbiterRefused(
                    f"{url} answered with something that is not JSON: {response.text[:200]!r}"
                ) from None
        try:
            error = response.json()
            message = str(error.get("message") or error.get("error") or "")
            code = int(error.get("code", -1))
        except (ValueError, AttributeError, TypeError):
            message, code = response.text.strip()[:200], -1
        if _INVALID_TOKEN in message:
            raise _TokenExpired(message)
        if code in _UNAVAILABLE_CODES or response.status_code >= 500:
            raise ArbiterUnavailable(f"etcd says {message or response.status_code!r}")
        hint = ""
        if "user name is empty" in message:
            hint = " (authentication is enabled: give --etcd-user and --etcd-password-file)"
        raise ArbiterRefused(
            f"etcd at {url.rsplit('/v3/', 1)[0]} refused us: "
            f"{message or f'HTTP {response.status_code}'}{hint}"
        )


class _EndpointRefused(ArbiterRefused):
    """This member refuses the connection (TLS); another member may not."""


class _TokenExpired(Exception):
    """The token we sent is no longer valid: authenticate again, once."""


@functools.cache
def _plain_http_context() -> ssl.SSLContext:
    """What httpx wants to be given for ``http://`` endpoints, where it goes unused."""
    return ssl.create_default_context()


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _ssl_problem(exc: BaseException) -> str | None:
    """The TLS error behind ``exc`` when it is a refusal (not a broken connection)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, _TRANSIENT_SSL):
            return getattr(seen, "verify_message", None) or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text, validate=True).decode()


def _format(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

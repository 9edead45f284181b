"""TLS for the forwarder: the ``ssl.SSLContext``s a forward's options describe, in one place.

A forward terminates TLS (``tls_cert``/``tls_key``: clients speak TLS to us, the upstream gets
plaintext), originates it (``upstream_tls``: we speak TLS to the upstream), or both
(re-encryption). `contexts()` builds the two contexts from the options' files, or takes the
caller's own (``Forwarder(tls_context=..., upstream_tls_context=...)``), and says in a
ValueError which option and which file is wrong, and why. It runs at start and on every reload:
a reload whose files are bad changes nothing.

Where it runs: the loops' listener does the handshakes and relays the records in C, through
the OpenSSL that Python's ssl module loaded (see ``_loop_tls.h``), with contexts built here for
it: the same settings, but no Python callback on them (`Contexts.certs`); the certificate for a
client's SNI is chosen in C. The pure listener (``_listener.PureListener``) does them without
blocking, as a state of each client in its selector loop, with `Contexts.server` (whose
``sni_callback`` chooses the certificate), and hands the TLS sockets to the backend's
``Bridge``, whose loops then relay the records where they can. `Contexts.loops_lack` says why
the loops cannot do a forward's handshakes, where they cannot.
"""

from __future__ import annotations

import ssl
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ._address import Address

#: --tls-min-version's choices, as ssl.TLSVersion.
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

#: Handshake failures by the SSL error's reason, for the metrics' label: a bounded set (an
#: unknown reason counts as "other"); "timeout" and "closed" are ours.
FAILURE_REASONS = frozenset(
    {
        "timeout",
        "closed",
        "certificate_verify_failed",
        "wrong_version_number",
        "http_request",
        "https_proxy_request",
        "unknown_protocol",
        "unsupported_protocol",
        "no_shared_cipher",
        "no_protocols_available",
        "no_application_protocol",
        "peer_did_not_return_a_certificate",
        "record_layer_failure",
        "packet_length_too_long",
        "unexpected_eof_while_reading",
        "unexpected_message",
        "bad_record_mac",
        "decryption_failed_or_bad_record_mac",
        "tlsv13_alert_certificate_required",
        "tlsv1_alert_unknown_ca",
        "tlsv1_alert_protocol_version",
        "tlsv1_alert_access_denied",
        "tlsv1_alert_decrypt_error",
        "tlsv1_alert_internal_error",
        "tlsv1_alert_no_application_protocol",
        "tlsv1_unrecognized_name",
        "sslv3_alert_bad_certificate",
        "sslv3_alert_certificate_unknown",
        "sslv3_alert_certificate_expired",
        "sslv3_alert_handshake_failure",
        "sslv3_alert_unexpected_message",
    }
)

#: The options this module reads, by name (the option table declares them).
TLS_NAMES = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_min_version",
    "tls_ciphers",
    "tls_alpn",
    "upstream_tls",
    "upstream_ca",
    "upstream_sni",
    "upstream_cert",
    "upstream_key",
    "upstream_insecure",
)


def check_file(item: str) -> str:
    """A file option's item: a path (read when the forward starts, and on reloads)."""
    if not item or "\0" in item:
        raise ValueError(f"{item!r}: expected a file name (empty, or with a NUL byte)")
    return item


def check_alpn(item: str) -> List[str]:
    """A --tls-alpn item: one protocol name or a comma list of them (``h2,http/1.1``)."""
    names = [name.strip() for name in item.split(",")]
    for name in names:
        if not name or len(name.encode("utf-8", "surrogateescape")) > 255:
            raise ValueError(f"{item!r}: expected protocol names of 1 to 255 bytes, separated by commas")
    return names


def _closed_early(exc: BaseException) -> bool:
    """The peer closed (or reset) during the handshake: an SSLEOFError on 3.10 and later, an
    SSLError of reason UNEXPECTED_EOF_WHILE_READING on 3.9 (whose contexts we strip of
    OP_IGNORE_UNEXPECTED_EOF), as the loops say it too."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True
    reason = getattr(exc, "reason", None)
    return isinstance(reason, str) and reason.upper() == "UNEXPECTED_EOF_WHILE_READING"


def failure_reason(exc: BaseException) -> str:
    """A failed handshake's reason, for the metrics' label (one of FAILURE_REASONS, or "other")."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if _closed_early(exc) or isinstance(exc, ConnectionError):
        return "closed"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        reason = reason.lower()
        return reason if reason in FAILURE_REASONS else "other"
    return "other"


def failure_label(words: str, closed: bool = False, timed_out: bool = False) -> str:
    """The metrics' label for a failed handshake the loops report by its words (OpenSSL's
    reason, as ERR_reason_error_string gives it), as `failure_reason` labels an exception."""
    if timed_out:
        return "timeout"
    if closed:
        return "closed"
    reason = words.partition(":")[0].strip().lower().replace(" ", "_")
    return reason if reason in FAILURE_REASONS else "other"


def failure_text(exc: BaseException) -> str:
    """A failed handshake's error as a log line says it: the verification's own words where
    there are some, without OpenSSL's source position."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if _closed_early(exc) or (isinstance(exc, ConnectionError) and not reason):
        return "closed during the handshake"
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    text = str(exc)
    return text.split(" (_ssl.c:")[0] if text else type(exc).__name__


class TlsInfo(NamedTuple):
    """What a bridge's TLS sides negotiated, for the open line and event: the client's
    (termination) and the upstream's (origination); None where that side is plaintext."""

    version: Optional[str] = None
    cipher: Optional[str] = None
    sni: Optional[str] = None
    client_subject: Optional[str] = None
    alpn: Optional[str] = None
    upstream_version: Optional[str] = None
    upstream_cipher: Optional[str] = None

    def text(self) -> str:
        """`` (TLS: TLSv1.3 TLS_AES_256_GCM_SHA384, sni example.com, client CN=a; upstream TLS: ...)``."""
        parts = []
        if self.version:
            client = f"TLS: {self.version} {self.cipher}"
            if self.sni:
                client += f", sni {self.sni}"
            if self.alpn:
                client += f", alpn {self.alpn}"
            if self.client_subject:
                client += f", client {self.client_subject}"
            parts.append(client)
        if self.upstream_version:
            parts.append(f"upstream TLS: {self.upstream_version} {self.upstream_cipher}")
        return f" ({'; '.join(parts)})" if parts else ""

    def fields(self) -> Dict[str, Any]:
        """The JSON event's fields (only those set)."""
        names = {
            "version": "tls_version",
            "cipher": "tls_cipher",
            "sni": "tls_sni",
            "client_subject": "tls_client_subject",
            "alpn": "tls_alpn",
            "upstream_version": "upstream_tls_version",
            "upstream_cipher": "upstream_tls_cipher",
        }
        return {names[name]: value for name, value in self._asdict().items() if value is not None}


def subject_text(cert: Mapping[str, Any]) -> Optional[str]:
    """A peer certificate's subject (``getpeercert()``'s form) as ``CN=client,O=Example``."""
    subject = cert.get("subject")
    if not subject:
        return None
    return ",".join(f"{_SHORT.get(key, key)}={value}" for rdn in subject for key, value in rdn)


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
}


def client_info(sock: ssl.SSLSocket) -> TlsInfo:
    """What a client's handshake (ours, as the server) negotiated."""
    cipher = sock.cipher()
    cert = sock.getpeercert()
    return TlsInfo(
        version=sock.version(),
        cipher=cipher[0] if cipher else None,
        sni=getattr(sock, "_t2t_server_name", None),
        client_subject=subject_text(cert) if cert else None,
        alpn=sock.selected_alpn_protocol(),
    )


def with_upstream(info: Optional[TlsInfo], sock: ssl.SSLSocket) -> TlsInfo:
    cipher = sock.cipher()
    return (info or TlsInfo())._replace(upstream_version=sock.version(), upstream_cipher=cipher[0] if cipher else None)


def upstream_hostname(address: Address) -> Optional[str]:
    """The host an upstream names, for SNI and the certificate check: ``db.internal`` for
    ``db.internal:5432`` (and its candidates ``db.internal:5432 (10.0.0.5)``), the address for
    an IP literal; None for a ``unix:`` path."""
    text = address.text
    if text.startswith("unix:"):
        return None
    text = text.split(" (", 1)[0]
    host = text.rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None


# -- building the contexts -------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    return str(exc).split(" (_ssl.c:")[0] or type(exc).__name__


def _readable(option: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: {path}: cannot read: {exc.strerror or exc}") from None


def _load_chain(context: ssl.SSLContext, option: str, cert: str, key: Optional[str], key_option: str) -> None:
    _readable(option, cert)
    if key is not None:
        _readable(key_option, key)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        what = f"{cert} with the key {key}" if key is not None else f"{cert} (no {key_option}: its key in it)"
        raise ValueError(f"{option}: {what}: not a certificate and its private key ({_reason(exc)})") from None


def _load_ca(context: ssl.SSLContext, option: str, path: str) -> None:
    _readable(option, path)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{option}: {path}: no CA certificate in it ({_reason(exc)})") from None


def cert_names(path: str) -> Tuple[str, ...]:
    """The DNS names (subjectAltName, else the common name) of the first certificate in `path`,
    lowercased: what SNI picks it by."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - every CPython has it
        return ()
    try:
        cert = decode(path)
    except (ssl.SSLError, OSError, ValueError):
        return ()
    names = [value.lower() for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value.lower() for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return tuple(names)


def _matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def _cuts_are_cuts(context: ssl.SSLContext) -> None:
    """A peer that closes without close_notify cut its stream: the other TLS side gets no alert
    for it, on every Python (the bridge ends as the socket's suppress_ragged_eofs says: "closed"
    for the forwarder's). 3.9's contexts set OP_IGNORE_UNEXPECTED_EOF, which reads such a cut as
    a clean end (and would vouch for it onward with close_notify)."""
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def certificate_contexts(
    certs: Sequence[Tuple[str, Optional[str]]],
    *,
    client_ca: Optional[str] = None,
    min_version: str = "1.2",
    ciphers: Optional[str] = None,
    alpn: Sequence[str] = (),
) -> List[Tuple[Tuple[str, ...], ssl.SSLContext]]:
    """A server context per (cert, key) pair, with the names a client's SNI picks it by, and
    no callback: the first is the default."""
    contexts: List[Tuple[Tuple[str, ...], ssl.SSLContext]] = []
    for cert, key in certs:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MIN_VERSIONS[min_version]
        # A client's TLS 1.2 renegotiation is refused (a no_renegotiation alert; the client
        # ends the bridge), as OpenSSL 3 does by default and 1.1.1 does not: it costs a
        # handshake's CPU each time a client asks. TLS 1.3's key updates pass.
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        _cuts_are_cuts(context)
        if ciphers is not None:
            try:
                context.set_ciphers(ciphers)
            except ssl.SSLError as exc:
                raise ValueError(f"tls_ciphers: {ciphers!r}: {_reason(exc)}") from None
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if client_ca is not None:
            _load_ca(context, "tls_client_ca", client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        _load_chain(context, "tls_cert", cert, key, "tls_key")
        contexts.append((cert_names(cert), context))
    return contexts


def server_context(
    certs: Sequence[Tuple[str, Optional[str]]],
    *,
    client_ca: Optional[str] = None,
    min_version: str = "1.2",
    ciphers: Optional[str] = None,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """The context clients handshake with in Python: one certificate per (cert, key) pair, the
    first the default, another chosen by the client's SNI when its names match (exact, or
    ``*.suffix`` for one label)."""
    contexts = certificate_contexts(certs, client_ca=client_ca, min_version=min_version, ciphers=ciphers, alpn=alpn)
    default = contexts[0][1]
    if len(contexts) > 1:
        by_sni = contexts[1:]

        def choose(sock: Any, server_name: Optional[str], _: ssl.SSLContext) -> None:
            try:
                sock._t2t_server_name = server_name
            except AttributeError:  # pragma: no cover - an SSLObject has no attributes of ours
                pass
            if server_name is None:
                return
            name = server_name.lower()
            for names, context in by_sni:
                if any(_matches(pattern, name) for pattern in names):
                    sock.context = context
                    return

        default.sni_callback = choose
    else:

        def note(sock: Any, server_name: Optional[str], _: ssl.SSLContext) -> None:
            try:
                sock._t2t_server_name = server_name
            except AttributeError:  # pragma: no cover
                pass

        default.sni_callback = note
    return default


def client_context(
    *,
    ca: Optional[str] = None,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    insecure: bool = False,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """The context we handshake with upstream: the system's CAs (or `ca`), the host name
    checked; `cert` (and `key`) for mutual TLS; `insecure`: no verification at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (verifies, and checks the host name)
    context.minimum_version = MIN_VERSIONS[min_version]
    _cuts_are_cuts(context)
    if ca is not None:
        _load_ca(context, "upstream_ca", ca)
    elif not insecure:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(context, "upstream_cert", cert, key, "upstream_key")
    return context


def _serve_alpn_in_c(contexts: Sequence[ssl.SSLContext], protocols: Sequence[str]) -> Optional[str]:
    """ALPN for the loops' contexts, chosen in C; else why not (the handshakes then run in Python)."""
    from ._backend import core, tls_unavailable

    why = tls_unavailable()
    if why is not None or core is None:
        return f"the loops cannot use OpenSSL: {why}"
    try:
        for context in contexts:
            core.serve_alpn(context, protocols)
    except ValueError as exc:
        return str(exc)
    return None


def wants_tls(settings: Mapping[str, Any]) -> bool:
    """Whether options (by name) ask for TLS on either side."""
    return bool(settings.get("tls_cert")) or bool(settings.get("upstream_tls"))


class Contexts(NamedTuple):
    """A forward's TLS contexts: `server` (termination, for handshakes in Python) and `client`
    (origination), None where that side is plaintext; `certs`, termination's contexts for the
    loops (each certificate's names and context, the first the default, none with a Python
    callback); `loops_lack`: why the loops cannot do these handshakes, None where they can."""

    server: Optional[ssl.SSLContext] = None
    client: Optional[ssl.SSLContext] = None
    certs: Tuple[Tuple[Tuple[str, ...], ssl.SSLContext], ...] = ()
    loops_lack: Optional[str] = None


def contexts(
    settings: Mapping[str, Any],
    tls_context: Optional[ssl.SSLContext] = None,
    upstream_tls_context: Optional[ssl.SSLContext] = None,
) -> Contexts:
    """The contexts that checked options (by name) describe; the caller's own contexts where
    given. ValueError names the option, the file and why."""
    certs: Tuple[str, ...] = tuple(settings.get("tls_cert") or ())
    keys: Tuple[str, ...] = tuple(settings.get("tls_key") or ())
    for name in ("tls_key", "tls_client_ca", "tls_ciphers", "tls_alpn"):
        if settings.get(name) and not certs and tls_context is None:
            raise ValueError(f"{name} needs tls_cert (TLS towards the clients)")
    if tls_context is not None and (certs or keys or settings.get("tls_client_ca")):
        raise ValueError("give tls_context or tls_cert/tls_key/tls_client_ca, not both")
    if keys and len(keys) != len(certs):
        raise ValueError(
            f"tls_key: {len(keys)} keys for {len(certs)} certificates: give one per tls_cert, in the same "
            "order, or none when each certificate file holds its key"
        )
    if tls_context is not None and not isinstance(tls_context, ssl.SSLContext):
        raise TypeError(f"tls_context must be an ssl.SSLContext, not {type(tls_context).__name__}")
    if upstream_tls_context is not None and not isinstance(upstream_tls_context, ssl.SSLContext):
        raise TypeError(f"upstream_tls_context must be an ssl.SSLContext, not {type(upstream_tls_context).__name__}")
    min_version = settings.get("tls_min_version") or "1.2"
    server: Optional[ssl.SSLContext] = tls_context
    loop_certs: Tuple[Tuple[Tuple[str, ...], ssl.SSLContext], ...] = ()
    lacking: Optional[str] = None
    if tls_context is not None or upstream_tls_context is not None:
        lacking = "a caller's own SSLContext may call Python during a handshake"
    if certs:
        pairs = [(cert, keys[i] if keys else None) for i, cert in enumerate(certs)]
        alpn = [name for item in settings.get("tls_alpn") or () for name in check_alpn(item)]
        chosen: Dict[str, Any] = dict(
            client_ca=settings.get("tls_client_ca"), min_version=min_version, ciphers=settings.get("tls_ciphers")
        )
        server = server_context(pairs, alpn=alpn, **chosen)
        loop_certs = tuple(certificate_contexts(pairs, **chosen))
        if alpn:
            lacking = lacking or _serve_alpn_in_c([context for _, context in loop_certs], alpn)
    upstream_wanted = bool(settings.get("upstream_tls")) or upstream_tls_context is not None
    for name in ("upstream_ca", "upstream_sni", "upstream_cert", "upstream_key", "upstream_insecure"):
        if settings.get(name) and not upstream_wanted:
            raise ValueError(f"{name} needs upstream_tls (TLS towards the upstream)")
    if settings.get("upstream_key") and not settings.get("upstream_cert"):
        raise ValueError("upstream_key needs upstream_cert")
    if settings.get("upstream_insecure") and settings.get("upstream_ca"):
        raise ValueError("upstream_insecure turns verification off: upstream_ca would not be used")
    if upstream_tls_context is not None and any(
        settings.get(name) for name in ("upstream_ca", "upstream_cert", "upstream_key", "upstream_insecure")
    ):
        raise ValueError("give upstream_tls_context or upstream_ca/upstream_cert/upstream_key/upstream_insecure")
    client: Optional[ssl.SSLContext] = upstream_tls_context
    if client is None and upstream_wanted:
        client = client_context(
            ca=settings.get("upstream_ca"),
            cert=settings.get("upstream_cert"),
            key=settings.get("upstream_key"),
            insecure=bool(settings.get("upstream_insecure")),
            min_version=min_version,
        )
    return Contexts(server, client, loop_certs, lacking)

"""
Unit tests of target parsing, header validation, header filtering, the
OperationOutcome renderer and configuration errors, including properties
checked with hypothesis.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest
from twisted.web import http
from twisted.web.client import URI
from twisted.web.http_headers import Headers

from ssp import config, errors, headers, policy, target
from ssp.errors import BadRequest, MethodNotAllowed
from ssp.model import MessageHandler

ENDPOINT_HOST = "orange.testlab.nhs.uk"
ENDPOINT_PATH = "/B82617/STU3/1/gpconnect/fhir"
HANDLER = MessageHandler("B82617-9198738", "urn:x", f"https://{ENDPOINT_HOST}{ENDPOINT_PATH}",
                         ENDPOINT_HOST, "S1")

# Pieces an attacker would combine into a target (SSRF and path escape).
_SCHEMES = ["https://", "http://", "HTTPS://", "https:/", "https:///", "//", "https%3A%2F%2F",
            "https%3a%2f%2f", "https%253A%252F%252F", ""]
_HOSTS = [ENDPOINT_HOST, "ORANGE.testlab.nhs.uk", f"{ENDPOINT_HOST}.", "127.0.0.1", "2130706433",
          "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "localhost", "[::1]",
          "[::ffff:127.0.0.1]", "[fe80::1%25eth0]", "xn--range-jua.testlab.nhs.uk",
          "\u00f6range.testlab.nhs.uk", f"a@{ENDPOINT_HOST}", f"{ENDPOINT_HOST}@127.0.0.1",
          f"{ENDPOINT_HOST}%40evil.test", f"{ENDPOINT_HOST}\\@evil.test", f"{ENDPOINT_HOST}#@evil",
          "evil.test", "", "%6frange.testlab.nhs.uk"]
_PORTS = ["", ":443", ":8443", ":", ":0", ":65536", ":+443", ":0443", ":44 3"]
_PIECES = ["B82617", "STU3", "1", "gpconnect", "fhir", "fhirX", "metadata", "Patient", "", ".",
           "..", "%2e", "%2E%2e", "%252e%252e", "%25%32%65", "%%32%65", "%2F", "%2f", "%252F",
           "%5C", "\\", "..;", "..;x", "%2e%2e%3b", ";a=b", "%00", "%0a", "%", "%zz", "%4", "@",
           "?", "#", "\u00e9", "%C3%A9", "a%20b", "~", "|", "%7C", "$", "x.y"]
_QUERIES = ["", "?", "?a=1", "?a=../../x", "?@127.0.0.1/", "?x=%2F..", "?#", "?a=%"]


def _fully_decoded(data: bytes) -> bytes:
    while True:
        decoded = unquote_to_bytes(data)
        if decoded == data:
            return data
        data = decoded


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def hostile_targets(draw: st.DrawFn) -> bytes:
    """
    A request-target assembled from hostile pieces; half of them start
    with the registered endpoint exactly, so many are accepted.
    """
    pieces = draw(st.lists(st.sampled_from(_PIECES), max_size=6))
    tail = "/".join(pieces)
    query = draw(st.sampled_from(_QUERIES))
    if draw(st.booleans()):
        prefix = f"https://{ENDPOINT_HOST}{ENDPOINT_PATH}"
        tail = draw(st.sampled_from(["/", "", "%2F", "/..%2F", ";", "?"])) + tail
    else:
        prefix = (draw(st.sampled_from(_SCHEMES)) + draw(st.sampled_from(_HOSTS))
                  + draw(st.sampled_from(_PORTS)) + draw(st.sampled_from(["/", "", "\\", "?"])))
    return ("/" + prefix + tail + query).encode("utf-8")


class TargetTests(unittest.SynchronousTestCase):
    def test_plain_and_encoded(self) -> None:
        plain = target.parse(b"/https://h.example:8443/a/b?x=%7C&x=|")
        self.assertEqual((plain.host, plain.port, plain.authority), ("h.example", 8443, b"h.example:8443"))
        self.assertEqual(plain.url, b"https://h.example:8443/a/b?x=%7C&x=|")
        encoded = target.parse(b"/https%3A%2F%2Fh.example%2Fa%2Fb?q=%7C")
        self.assertEqual(encoded.url, b"https://h.example/a/b?q=%7C")
        self.assertEqual(target.parse(b"/https://[::1]:9/x").host, "[::1]")

    def test_refused(self) -> None:
        for uri in (b"https://h/x", b"/http://h/x", b"/https://u@h/x", b"/https:///x",
                    b"/https://h", b"/https://h/x#f", b"/https://h/a/../b", b"/https://h/a/%2e%2E/b",
                    b"/https://h/a b", b"/https://h/\x01", b"/https://h/\xc3\xa9", b"/https://h:0/x",
                    b"/https://h:/x", b"/https://h_/x", b"/https://h\\x/y", b"/https://[zz]/x",
                    b"/https%3A%2F%2Fh%2Fa%2F..%2Fb", b"/https://h/a/..%2Fb", b"/https://h/a%2F..",
                    b"/https://h/%252e%252e/b", b"/https://h/a/..;/b", b"/https://h/a/%2e%2e%3B/b",
                    b"/https://h/a%5Cb", b"/https://h/a%00", b"/https://h/a%", b"/https://h/%zz",
                    b"/https://h./x", b"/https://h:443\n/x", b"/https://[::1]\n/x"):
            with self.assertRaises(BadRequest, msg=uri):
                target.parse(uri)

    def test_paths_must_be_utf8_at_every_depth(self) -> None:
        """
        Percent-decoded path bytes must be UTF-8, however often encoded:
        overlong forms (C{%c0%ae} is an overlong C{.}), surrogates,
        truncated sequences, code points above U+10FFFF.
        """
        for path in (b"%c0%ae%c0%ae/admin", b"%25c0%25ae", b"%252525c0%252525ae", b"%ed%a0%80",
                     b"%e2%82", b"a%ff", b"%f4%90%80%80", b"%c3%25a9", b"%e0%80%af"):
            with self.assertRaises(BadRequest, msg=path) as caught:
                target.parse(b"/https://h/x/" + path)
            self.assertEqual(caught.exception.token,
                             "BAD_REQUEST: target URL path must be UTF-8 once percent-decoded")
        for path in (b"caf%c3%a9", b"caf%25c3%25a9", b"%e2%82%ac", b"%f0%9f%98%80"):
            self.assertEqual(target.parse(b"/https://h/x/" + path).url, b"https://h/x/" + path)

    def test_methods(self) -> None:
        for method in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"):
            target.check_method(method)
        for method in (b"TRACE", b"CONNECT", b"HEAD", b"get", b""):
            self.assertRaises(MethodNotAllowed, target.check_method, method)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_any_bytes_parse_or_refuse(self, tail: bytes) -> None:
        try:
            parsed = target.parse(b"/https://" + tail)
        except BadRequest:
            return
        self.assertTrue(parsed.url.startswith(b"https://" + parsed.authority + b"/"))
        self.assertNotIn(b"@", parsed.authority)
        self.assertFalse(any(c < 0x21 or c > 0x7E for c in parsed.url))
        self.assertNotIn(b"#", parsed.url)
        self.assertEqual(target.parse(b"/" + parsed.url), parsed)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"\A[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}\Z"),
           st.lists(st.from_regex(r"\A([A-Za-z0-9$_-]|%[2-7][0-9A-E]){1,8}\Z"), max_size=5),
           st.from_regex(r"\A[A-Za-z0-9=&%|+]{0,30}\Z"))
    def test_valid_urls_forwarded_unchanged(self, host: str, segments: list, query: str) -> None:
        def harmless(segment: str) -> bool:
            levels = [segment.encode()]
            while unquote_to_bytes(levels[-1]) != levels[-1]:
                levels.append(unquote_to_bytes(levels[-1]))
            decoded = levels[-1]
            return (decoded.partition(b";")[0] not in (b".", b"..")
                    and not re.search(rb"[\x00-\x1f\x7f/\\]", decoded)
                    and all(_is_utf8(level) for level in levels))

        segments = [s for s in segments if harmless(s)]
        url = f"https://{host}/{'/'.join(segments)}" + (f"?{query}" if query else "")
        self.assertEqual(target.parse(b"/" + url.encode()).url, url.encode())

    @settings(max_examples=1500, deadline=None)
    @given(hostile_targets())
    @example(b"/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/..%2F..%2Fadmin")
    @example(b"/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/..;/admin")
    @example(b"/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir?@127.0.0.1/")
    def test_accepted_targets_stay_within_the_endpoint(self, uri: bytes) -> None:
        """
        Whatever is accepted by both the target parser and the endpoint
        check is an https URL that every parser on the way (ours, the
        standard library's, the Twisted Agent's that forwards it) reads as
        the registered host and port, with a path under the registered
        one that no decoding or dot-segment resolution takes outside it.
        Anything else is refused with L{BadRequest} and nothing else.
        """
        try:
            parsed = target.parse(uri)
            policy.check_target(HANDLER, parsed.text)
        except BadRequest:
            return
        self.assertEqual(target.parse(b"/" + parsed.url), parsed)
        self.assertEqual((parsed.host, parsed.port, parsed.authority),
                         (ENDPOINT_HOST, 443, ENDPOINT_HOST.encode()))
        split = urlsplit(parsed.text)
        self.assertEqual((split.scheme, split.netloc, split.port, split.fragment),
                         ("https", ENDPOINT_HOST, None, ""))
        agent = URI.fromBytes(parsed.url)
        self.assertEqual((agent.scheme, agent.host, agent.port),
                         (b"https", ENDPOINT_HOST.encode(), 443))
        origin = parsed.url[len(b"https://" + parsed.authority):]
        self.assertIn(agent.originForm, (origin, origin.rstrip(b"?")))
        path = agent.originForm.partition(b"?")[0]
        self.assertTrue(path == ENDPOINT_PATH.encode()
                        or path.startswith(ENDPOINT_PATH.encode() + b"/"), path)
        decoded = _fully_decoded(path)
        for segment in decoded.split(b"/"):
            self.assertNotIn(segment.partition(b";")[0], (b".", b".."))
        self.assertNotIn(b"\\", decoded)
        self.assertTrue(_is_utf8(decoded), path)
        self.assertEqual(decoded.count(b"/"), path.count(b"/"))
        resolved = posixpath.normpath(decoded.decode("latin-1"))
        self.assertTrue(resolved.startswith(ENDPOINT_PATH), resolved)


class HeaderTests(unittest.SynchronousTestCase):
    valid = {
        "Ssp-TraceID": "5F0B2A4E-1C1D-4F7E-9A55-0C1E2D3F4A5B",
        "Ssp-From": "200000000359",
        "Ssp-To": "918999198738",
        "Ssp-InteractionID": "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
    }

    def parse(self, **changes):
        values = {**self.valid, **changes}
        return headers.parse(Headers({k: [v] for k, v in values.items() if v is not None}))

    def test_valid(self) -> None:
        self.assertEqual(self.parse().receiver, "918999198738")

    def test_each_rule(self) -> None:
        for name in self.valid:
            for bad in (None, "", "x y", "urn:nhs:names:services:" + "x" * 300):
                with self.assertRaises(BadRequest) as caught:
                    self.parse(**{name: bad})
                self.assertIn(name, caught.exception.token)

    def test_repeated(self) -> None:
        raw = Headers({k: [v] for k, v in self.valid.items()})
        raw.addRawHeader("Ssp-From", "1")
        with self.assertRaises(BadRequest) as caught:
            headers.parse(raw)
        self.assertEqual(caught.exception.token, "BAD_REQUEST: Ssp-From header is repeated")

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(
        st.sampled_from([b"Ssp-TraceID", b"ssp-traceid", b"Ssp-From", b"SSP-FROM", b"Ssp-To",
                         b"Ssp-InteractionID", b"X-Other"]),
        st.one_of(st.binary(max_size=60),
                  st.sampled_from([b"5F0B2A4E-1C1D-4F7E-9A55-0C1E2D3F4A5B", b"200000000359",
                                   b"200000000359\n", b" 200000000359", b"\x00",
                                   b"urn:nhs:names:services:gpconnect:x", b"\xff" * 30])),
    ), max_size=10))
    def test_validation_raises_only_bad_request(self, raw: list) -> None:
        """
        Any header block, however hostile, is either refused with
        L{BadRequest} naming an C{Ssp-*} header, or yields values that match
        their rule completely (no trailing newline, no extra bytes).
        """
        block = Headers()
        for name, value in raw:
            block.addRawHeader(name, value)
        try:
            parsed = headers.parse(block)
        except BadRequest as e:
            self.assertRegex(e.token, r"^BAD_REQUEST: Ssp-(TraceID|From|To|InteractionID) header ")
            return
        self.assertRegex(parsed.trace_id, r"\A[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\Z")
        self.assertRegex(parsed.sender, r"\A[0-9]{1,20}\Z")
        self.assertRegex(parsed.receiver, r"\A[0-9]{1,20}\Z")
        self.assertRegex(parsed.interaction, r"\Aurn:nhs:names:services:[\x21-\x7e]{1,200}\Z")

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def test_asid_is_digits_only(self, value: str) -> None:
        try:
            parsed = self.parse(**{"Ssp-From": value})
        except (BadRequest, ValueError, UnicodeEncodeError):
            return
        self.assertTrue(parsed.sender.isascii() and parsed.sender.isdigit())

    def test_singletons_once_and_not_a_list(self) -> None:
        for name in ("Authorization", "Ssp-TraceID", "Ssp-From", "Ssp-To", "Ssp-InteractionID",
                     "Host", "Content-Type"):
            seen: set[bytes] = set()
            lower = name.lower().encode()
            self.assertIsNone(headers.field_refusal(lower, b"x", seen))
            for value in (b"x", b"y"):
                self.assertEqual(headers.field_refusal(lower, value, seen).token,
                                 f"BAD_REQUEST: {name} header is repeated")
            self.assertEqual(headers.field_refusal(lower, b"a,b", set()).token,
                             f"BAD_REQUEST: {name} header is repeated")
        self.assertIsNone(headers.field_refusal(
            b"content-type", b'multipart/related; boundary="a,b"; type="x\\",y"', set()))
        self.assertIsNotNone(headers.field_refusal(
            b"content-type", b'text/plain; a="x", text/html', set()))
        self.assertIsNone(headers.field_refusal(b"x-list", b"a,b", set()))

    def test_host_syntax(self) -> None:
        for value in (b"localhost", b"proxy.example:8443", b"[::1]", b"[2001:db8::1]:443",
                      b"10.0.0.1:1", b"a-b.c_d~e:65535", b"%41bc", b""):
            self.assertIsNone(headers.field_refusal(b"host", value, set()), value)
        for value in (b"user@proxy", b"user:pw@proxy:443", b"proxy/path", b"proxy:443/x",
                      b"a b", b"proxy:", b"proxy:0", b"proxy:65536", b"proxy:123456",
                      b"proxy:http", b"[::1", b"[zz::1]", b"[::1]x", b"::1", b"proxy?x",
                      b"proxy#x", b"%zz"):
            self.assertEqual(
                headers.field_refusal(b"host", value, set()).token,
                "BAD_REQUEST: Host header must be host[:port] without user information, "
                "path or spaces", value)

    def test_connection_options(self) -> None:
        for value, name in ((b"Authorization", "Authorization"), (b"close, ssp-from", "Ssp-From"),
                            (b"SSP-TRACEID", "Ssp-TraceID"), (b"keep-alive,Ssp-Custom", "ssp-custom"),
                            (b"Host", "Host"), (b"content-length", "Content-Length"),
                            (b"Transfer-Encoding", "Transfer-Encoding")):
            self.assertEqual(headers.field_refusal(b"connection", value, set()).token,
                             f"BAD_REQUEST: Connection header must not name {name}")
        self.assertEqual(headers.field_refusal(b"connection", b"close x", set()).token,
                         "BAD_REQUEST: Connection header must list header names")
        for value in (b"close", b"keep-alive, X-Secret", b", ,close", b"TE, Upgrade"):
            self.assertIsNone(headers.field_refusal(b"connection", value, set()), value)
        self.assertEqual(
            headers.connection_options(Headers({"Connection": ["Close, X-A", " ,x-b "]})),
            {b"close", b"x-a", b"x-b"})

    def test_parse_refuses_what_the_channel_refuses(self) -> None:
        """
        Callers other than the channel (the explain tool, unit tests) get
        the same field checks.
        """
        raw = Headers({k: [v] for k, v in self.valid.items()})
        raw.addRawHeader("Authorization", "Bearer a..")
        raw.addRawHeader("Authorization", "Bearer b..")
        with self.assertRaises(BadRequest) as caught:
            headers.parse(raw)
        self.assertEqual(caught.exception.token, "BAD_REQUEST: Authorization header is repeated")
        self.assertEqual(headers.single(raw, b"authorization"), None)
        self.assertEqual(headers.single(raw, b"ssp-from"), b"200000000359")

    def test_fields_checked_skips_only_the_field_checks(self) -> None:
        """
        For the strict channel's requests (every field already passed
        L{headers.field_refusal}) the field checks are not run again; the
        C{Ssp-*} rules still are.
        """
        raw = Headers({k: [v] for k, v in self.valid.items()})
        raw.addRawHeader("Host", "a, b")
        self.assertRaises(BadRequest, headers.parse, raw)
        self.assertEqual(headers.parse(raw, fields_checked=True).sender, "200000000359")
        raw.removeHeader("Ssp-To")
        with self.assertRaises(BadRequest) as caught:
            headers.parse(raw, fields_checked=True)
        self.assertEqual(caught.exception.token, "BAD_REQUEST: Ssp-To header is missing")

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.floats(0, 4_102_444_800), min_size=1, max_size=5))
    def test_http_date_is_twisteds(self, times: list[float]) -> None:
        """
        The per-second cache gives what Twisted formats, whatever order the
        times come in (a clock stepped back included).
        """
        for seconds in [*times, *reversed(times)]:
            self.assertEqual(headers.http_date(seconds), http.datetimeToString(seconds))

    def test_upstream_filtering(self) -> None:
        incoming = Headers({
            "Connection": ["close, X-Secret"], "X-Secret": ["s"], "Keep-Alive": ["1"],
            "Host": ["proxy"], "Content-Length": ["3"], "X-Kept": ["a", "b"],
            "Forwarded": ["for=1.2.3.4"], "Proxy-Authorization": ["p"],
        })
        parsed = target.parse(b"/https://p.example:8443/x")
        out = headers.upstream_headers(incoming, parsed, headers.forwarded_element("::1", "10.0.0.1"))
        names = {n.lower() for n, _ in out.getAllRawHeaders()}
        self.assertEqual(names, {b"x-kept", b"forwarded", b"host"})
        self.assertEqual(out.getRawHeaders(b"x-kept"), [b"a", b"b"])
        self.assertEqual(out.getRawHeaders(b"host"), [b"p.example:8443"])
        self.assertEqual(out.getRawHeaders(b"forwarded"),
                         [b"for=1.2.3.4", b'for="[::1]";proto=https;by=10.0.0.1'])


class OutcomeTests(unittest.SynchronousTestCase):
    def test_json(self) -> None:
        content_type, body = errors.operation_outcome(errors.Forbidden.sender("1"))
        self.assertEqual(content_type, b"application/fhir+json")
        document = json.loads(body)
        issue = document["issue"][0]
        self.assertEqual((issue["code"], issue["details"]["coding"][0]["code"], issue["diagnostics"]),
                         ("forbidden", "403", "ASID_CHECK_FAILED_MESSAGESENDER_1"))

    def test_xml_escapes(self) -> None:
        content_type, body = errors.operation_outcome(BadRequest('a<b>&"c'), xml=True)
        self.assertEqual(content_type, b"application/fhir+xml")
        self.assertIn(b'<diagnostics value="a&lt;b&gt;&amp;&quot;c"/>', body)

    def test_negotiation(self) -> None:
        self.assertTrue(errors.wants_xml(b"application/fhir+xml"))
        self.assertFalse(errors.wants_xml(b"application/fhir+json"))
        self.assertFalse(errors.wants_xml(None))
        self.assertTrue(errors.wants_xml(b"application/fhir+json", b"application/fhir+xml"))


class ConfigTests(unittest.SynchronousTestCase):
    base = {"tls": {"certificate": "a", "private_key": "b", "client_ca": "c"},
            "upstream": {"certificate": "a", "private_key": "b", "ca": "c"},
            "audit": {"key_file": "/etc/ssp/private/audit.key"}}

    def error(self, **sections) -> str:
        table = {k: dict(v) for k, v in self.base.items()}
        for name, values in sections.items():
            table[name] = {**table.get(name, {}), **values}
        with self.assertRaises(config.ConfigError) as caught:
            config.parse(table, Path("/etc/ssp/ssp.toml"))
        return str(caught.exception)

    def test_errors_name_file_and_key(self) -> None:
        self.assertEqual(self.error(upstream={"idle_timeout": 0}),
                         "/etc/ssp/ssp.toml: upstream.idle_timeout: must be > 0: 0.0")
        self.assertEqual(self.error(throttle={"consumer": {"default": {"rate": "x"}}}),
                         "/etc/ssp/ssp.toml: throttle.consumer.default.rate: expected int, got str")
        self.assertEqual(self.error(directory={"kind": "x"}),
                         "/etc/ssp/ssp.toml: directory.kind: must be in ['ldif', 'ldap'] (got 'x')")
        self.assertEqual(self.error(tls={"extra": 1}),
                         "/etc/ssp/ssp.toml: tls.extra: unknown key")

    def test_paths_relative_to_file(self) -> None:
        loaded = config.parse(self.base, Path("/etc/ssp/ssp.toml"))
        self.assertEqual(loaded.tls.certificate, Path("/etc/ssp/a"))

    def test_unreadable_and_invalid_files(self) -> None:
        with self.assertRaises(config.ConfigError) as caught:
            config.load("/nonexistent/ssp.toml")
        self.assertIn("/nonexistent/ssp.toml: cannot read", str(caught.exception))
        bad = Path(self.mktemp())
        bad.write_text("[tls\n")
        with self.assertRaises(config.ConfigError) as caught:
            config.load(bad)
        self.assertIn("invalid TOML", str(caught.exception))

    def test_example_configuration_parses(self) -> None:
        # The example names the key under systemd's LoadCredential= directory.
        self.patch(os, "environ", {**os.environ, "CREDENTIALS_DIRECTORY": "/run/credentials/ssp"})
        loaded = config.load(Path(__file__).parent.parent / "etc" / "ssp.toml")
        self.assertEqual(loaded.throttle.consumer.for_asid("1").burst, 40)

"""The SNI parser in Python (``_sni``) and in C (``_loop_sni.h``, built here into a small shared
library and called through ctypes): one corpus both must answer exactly (same name, same length,
same error text), random and mangled input on which they must agree, and routing by name."""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sni_corpus import CASES, CCS, NEED, VALID, Case, error, message_of, ok, records, ssl_hello
from tcptotcp import _sni
from tcptotcp._sni import MAX_INPUT, ClientHello, SniError, check_route_pattern, match_route, parse_client_hello

# The header from the source tree (a wheel does not install it), else next to the module.
HEADERS = [Path(__file__).resolve().parent.parent / "src" / "tcptotcp" / "_loop_sni.h"]
HEADERS.append(Path(_sni.__file__).with_name("_loop_sni.h"))

WRAPPER = r"""
#include "_loop_sni.h"

int sni_parse(const unsigned char *data, size_t len, char *name, size_t name_max, size_t *hello_len) {
    return t2t_sni_parse(data, len, name, name_max, hello_len);
}
void sni_error_text(int code, const unsigned char *data, size_t len, char *out, size_t out_max) {
    t2t_sni_error_text(code, data, len, out, out_max);
}
int sni_match(const char *name, const char *const *patterns, int npatterns) {
    return t2t_sni_match(name, patterns, npatterns);
}
size_t sni_in_max(void) { return T2T_SNI_IN_MAX; }
size_t sni_hello_max(void) { return T2T_SNI_HELLO_MAX; }
"""


def pure_parse(data: bytes):
    """parse_client_hello's answer in the corpus' terms."""
    try:
        hello = parse_client_hello(data)
    except SniError as exc:
        assert type(exc) is SniError and isinstance(exc, ValueError)
        return error(str(exc))
    if hello is None:
        return NEED
    assert isinstance(hello, ClientHello)
    return ok(hello.server_name, hello.length)


class CSni:
    """The C twin, through ctypes."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.sni_parse.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.sni_parse.argtypes.append(ctypes.POINTER(ctypes.c_size_t))
        lib.sni_parse.restype = ctypes.c_int
        lib.sni_error_text.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.sni_error_text.restype = None
        lib.sni_match.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
        lib.sni_match.restype = ctypes.c_int
        lib.sni_in_max.restype = ctypes.c_size_t
        lib.sni_hello_max.restype = ctypes.c_size_t

    def parse_raw(self, data: bytes, name_max: int = 256):
        name = ctypes.create_string_buffer(b"\xaa" * max(name_max, 1), max(name_max, 1))
        hello_len = ctypes.c_size_t(12345)
        code = self.lib.sni_parse(bytes(data), len(data), name, name_max, ctypes.byref(hello_len))
        return code, name, hello_len.value

    def parse(self, data: bytes):
        code, name, hello_len = self.parse_raw(data)
        if code == 0:
            return NEED
        if code == 1:
            return ok(name.value.decode("ascii") or None, hello_len)
        assert code < 0
        out = ctypes.create_string_buffer(256)
        self.lib.sni_error_text(code, bytes(data), len(data), out, len(out))
        return error(out.value.decode("ascii"))

    def match(self, name, patterns) -> int:
        array = (ctypes.c_char_p * max(len(patterns), 1))(*[p.encode() for p in patterns])
        return self.lib.sni_match(None if name is None else name.encode(), array, len(patterns))


@pytest.fixture(scope="module")
def c_sni(tmp_path_factory) -> CSni:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    header = next((path for path in HEADERS if path.is_file()), None)
    if header is None:
        pytest.skip("_loop_sni.h not found (an installed package without its source tree)")
    work = tmp_path_factory.mktemp("sni")
    (work / "wrap.c").write_text(WRAPPER)
    lib = work / "libsni.so"
    command = [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC"]
    command += ["-I", str(header.parent), "-o", str(lib), str(work / "wrap.c")]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return CSni(ctypes.CDLL(str(lib)))


def _ids(cases):
    return [case.label for case in cases]


# --- the corpus -----------------------------------------------------------------------------------


def test_corpus_is_broad():
    kinds = [case.expected[0] for case in CASES]
    assert len(CASES) >= 300
    assert kinds.count("ok") >= 50 and kinds.count("error") >= 100 and kinds.count("need") >= 100
    texts = {case.expected[1] for case in CASES if case.expected[0] == "error"}
    assert len(texts) >= 40  # each refusal, and values within them
    assert len(CASES) == len({case.label for case in CASES})


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_pure_parser(case: Case):
    assert pure_parse(case.data) == case.expected
    assert pure_parse(bytearray(case.data)) == case.expected


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_c_parser(c_sni, case: Case):
    assert c_sni.parse(case.data) == case.expected


def test_c_bounds_match_python(c_sni):
    assert c_sni.lib.sni_in_max() == MAX_INPUT == 16384 + 5 * 64
    assert c_sni.lib.sni_hello_max() == _sni.MAX_HELLO == 16384


def test_c_name_buffer_is_bounded(c_sni):
    wire = ssl_hello("Example.COM")
    code, name, hello_len = c_sni.parse_raw(wire, name_max=4)
    assert (code, name.raw, hello_len) == (1, b"exa\x00", len(wire))
    code, name, _ = c_sni.parse_raw(wire, name_max=0)
    assert code == 1 and name.raw == b"\xaa"  # nothing written


def test_c_error_text_for_another_input(c_sni):
    code, _, _ = c_sni.parse_raw(b"GET /")
    out = ctypes.create_string_buffer(64)
    c_sni.lib.sni_error_text(code, b"\x16\x02\x00", 3, out, len(out))
    assert out.value == b"no SNI error %d for this input" % code
    c_sni.lib.sni_error_text(code, b"GET /", 5, out, 8)  # truncated, still terminated
    assert out.value == b"not TLS"


def test_every_strict_prefix_of_a_valid_hello_needs_more():
    for data in VALID[:40]:
        answer = pure_parse(data)
        cut = answer[2]
        assert all(parse_client_hello(data[:k]) is None for k in range(cut))


def test_input_bound_is_tight():
    """The worst case a client may send: a hello of MAX_HELLO bytes over MAX_RECORDS records."""
    big = next(case.data for case in CASES if case.label == "hello-16384-64-records")
    assert len(big) == MAX_INPUT
    assert parse_client_hello(big[:-1]) is None
    assert parse_client_hello(big + CCS) == ClientHello("big.example.com", MAX_INPUT)


# --- random and mangled input: the two always agree -------------------------------------------------

MUTANTS = [data for data in VALID if len(data) < 2000][::3]
BIG = next(case.data for case in CASES if case.label == "hello-16384")


@st.composite
def _mutants(draw):
    """A whole hello, re-split into records or not, with bytes changed, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(MUTANTS)))
    if draw(st.booleans()):
        message = message_of(bytes(data))
        sizes = draw(st.lists(st.integers(1, 80), max_size=70))
        data = bytearray(records(message, sizes))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 4))
        if action == 0:
            data[at] = draw(st.integers(0, 255))
        elif action == 1:  # nudge a length byte
            data[at] = (data[at] + draw(st.sampled_from([-2, -1, 1, 2]))) % 256
        elif action == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == 3:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data = data[:at]
    return bytes(data)


_structured = st.builds(
    lambda version, length, rest: b"\x16" + version + length + rest,
    st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x05", b"\x02\x00"]),
    st.binary(min_size=0, max_size=2),
    st.binary(max_size=200).map(lambda b: b"\x01\x00" + b),
)

_inputs = st.one_of(st.binary(max_size=400), _structured, _mutants())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_inputs, cut=st.integers(0, 3000))
def test_random_input_same_answer(c_sni, data, cut):
    answer = pure_parse(data)
    assert c_sni.parse(data) == answer
    # A prefix never contradicts the whole: it needs more, or already answers the same.
    prefix = pure_parse(data[:cut])
    assert prefix == NEED or prefix == answer
    if len(data) >= MAX_INPUT:
        assert answer != NEED


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 600), max_size=80), tail=st.binary(max_size=20), seed=st.integers(0, 2**32))
def test_big_hello_split_any_way_answers_within_the_bound(c_sni, sizes, tail, seed):
    data = records(message_of(BIG), sizes)
    if random.Random(seed).random() < 0.5:  # a byte changed in a record header
        rng = random.Random(seed)
        at = rng.randrange(min(len(data), 5 * (len(sizes) + 1)))
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    data = (data + tail)[:MAX_INPUT]
    answer = pure_parse(data)
    assert c_sni.parse(data) == answer
    if len(data) == MAX_INPUT:
        assert answer != NEED


# --- routing by name ------------------------------------------------------------------------------

PATTERNS = ["db.example.com", "*.example.com", "*.eu.example.com", "example.org", "*.example.org"]

ROUTES = [
    ("db.example.com", PATTERNS, 0),  # exact
    ("www.example.com", PATTERNS, 1),  # wildcard
    ("a.b.example.com", PATTERNS, 1),  # any depth below
    ("x.eu.example.com", PATTERNS, 2),  # the deeper wildcard beats the shallower one
    ("eu.example.com", PATTERNS, 1),  # its own suffix is not below *.eu.example.com
    ("example.com", PATTERNS, -1),  # a bare domain is not in its wildcard
    ("example.org", PATTERNS, 3),  # exact, a wildcard of the same domain after it
    ("www.example.org", PATTERNS, 4),
    ("example.net", PATTERNS, -1),
    ("notexample.com", PATTERNS, -1),  # a suffix only at a label boundary
    ("DB.Example.COM", PATTERNS, 0),  # case
    ("db.example.com.", PATTERNS, 0),  # trailing dot
    ("www.example.com.", PATTERNS, 1),
    ("db.example.com", ["*.example.com", "DB.EXAMPLE.COM"], 1),  # exact beats wildcard, whatever the order
    ("db.example.com", ["*.example.com", "*.Example.com"], 0),  # ties: the earliest
    ("db.example.com", ["db.example.com", "db.example.com."], 0),
    ("db.example.com", ["*.com", "*.example.com", "*.com"], 1),
    ("a.b.c", ["*.c", "*.b.c", "*.a.b.c"], 1),
    ("db.example.com", ["db.example.com.", "x"], 0),  # a pattern's trailing dot too
    ("db.example.com", ["*.example.com."], 0),
    ("db.example.com", [], -1),
    (None, PATTERNS, -1),
    ("", PATTERNS + [""], -1),  # no name never matches
    (".", ["", "."], -1),
    ("a", ["*", "*.", "a."], 2),
    ("*", ["*"], 0),  # exact text, even if no parsed name can be it
    (".example.com", ["*.example.com"], -1),  # nothing before the suffix
    ("x..example.com", ["*.example.com"], 0),
    ("b\u00fccher.example", ["*.example", "B\u00fccher.example"], 1),  # non-ASCII: exact bytes
    ("B\u00dcCHER.example", ["b\u00fccher.example"], -1),  # ... no case folding beyond ASCII
]


@pytest.mark.parametrize("name, patterns, expected", ROUTES)
def test_match_route(name, patterns, expected):
    assert match_route(name, patterns) == expected


@pytest.mark.parametrize("name, patterns, expected", ROUTES)
def test_c_match(c_sni, name, patterns, expected):
    assert c_sni.match(name, patterns) == expected


_text = st.text(alphabet="abAB-_.*", max_size=5)
_pattern = _text.map(lambda s: "*." + s[1:] if s.startswith("*") else s)


@settings(max_examples=300, deadline=None)
@given(name=_text, patterns=st.lists(_pattern, max_size=6))
def test_match_route_same_in_c(c_sni, name, patterns):
    assert c_sni.match(name, patterns) == match_route(name, patterns)


def test_match_route_with_parsed_names():
    wire = ssl_hello("API.Example.COM.")
    hello = parse_client_hello(wire)
    assert hello is not None and hello.server_name == "api.example.com"
    assert match_route(hello.server_name, ["*.com", "api.example.com", "*.example.com"]) == 1


@pytest.mark.parametrize(
    "text, normal",
    [
        ("db.example.com", "db.example.com"),
        ("*.Example.COM", "*.example.com"),
        ("Example.com.", "example.com"),
        ("*.com", "*.com"),
        ("_srv.my-host", "_srv.my-host"),
        ("localhost", "localhost"),
        (".".join(["x" * 63] * 4), ".".join(["x" * 63] * 4)),
    ],
)
def test_check_route_pattern(text, normal):
    assert check_route_pattern(text) == normal


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "bad route pattern '': empty name"),
        (".", "bad route pattern '.': empty name"),
        ("*.", "bad route pattern '*.': '*' only as a whole first label, as in *.example.com"),
        ("*", "bad route pattern '*': '*' only as a whole first label, as in *.example.com"),
        ("*example.com", "bad route pattern '*example.com': '*' only as a whole first label, as in *.example.com"),
        ("a.*.com", "bad route pattern 'a.*.com': '*' only as a whole first label, as in *.example.com"),
        ("*.*.com", "bad route pattern '*.*.com': '*' only as a whole first label, as in *.example.com"),
        ("a..com", "bad route pattern 'a..com': empty label"),
        (".a.com", "bad route pattern '.a.com': empty label"),
        ("a.com..", "bad route pattern 'a.com..': empty label"),
        ("exa mple.com", "bad route pattern 'exa mple.com': bad character ' '"),
        ("example.com:443", "bad route pattern 'example.com:443': bad character ':'"),
        ("b\u00fccher.de", "bad route pattern 'b\u00fccher.de': bad character '\u00fc'"),
        ("x" * 64 + ".com", "bad route pattern '%s.com': label longer than 63 characters" % ("x" * 64)),
        (
            ".".join(["x" * 63] * 4) + "x",
            "bad route pattern '%sx': longer than 255 characters" % ".".join(["x" * 63] * 4),
        ),
    ],
)
def test_check_route_pattern_refuses(text, message):
    with pytest.raises(ValueError) as info:
        check_route_pattern(text)
    assert str(info.value) == message

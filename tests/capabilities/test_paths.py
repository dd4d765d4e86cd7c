"""Request paths decode one way only, or are refused; globs match whole segments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capgate.capabilities import paths
from capgate.capabilities.errors import RequestError


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("/", "/"),
        ("/search", "/search"),
        ("/search/", "/search/"),
        ("/search/lhr-jfk/2026-03-01", "/search/lhr-jfk/2026-03-01"),
        ("/v1/charges", "/v1/charges"),
        ("/files/a%20b", "/files/a b"),
        ("/caf%C3%A9", "/café"),
        ("/café", "/café"),
        ("/a/.hidden/b..c/...", "/a/.hidden/b..c/..."),
        ("/a:b@c!$&'()*+,=~", "/a:b@c!$&'()*+,=~"),
    ],
)
def test_an_unambiguous_path_is_accepted_and_decoded(raw: str, decoded: str) -> None:
    assert paths.normalize(decoded) == decoded, "a second decoding would read the path differently"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/a/../b", id="dot-dot"),
        pytest.param("/a/..", id="trailing-dot-dot"),
        pytest.param("/a/./b", id="dot"),
        pytest.param("/a/.", id="trailing-dot"),
        pytest.param("/a/%2e%2e/b", id="encoded-dot-dot"),
        pytest.param("/a/%2E%2E/b", id="encoded-dot-dot-upper"),
        pytest.param("/a/%2E/b", id="encoded-dot-upper"),
        pytest.param("/a/.%2e/b", id="half-encoded-dot-dot"),
        pytest.param("/search/x%2e", id="encoded-dot-in-name"),
        pytest.param("//search", id="leading-double-slash"),
        pytest.param("/a//b", id="double-slash"),
        pytest.param("/a%2Fb", id="encoded-slash-upper"),
        pytest.param("/a%2fb", id="encoded-slash"),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/a%5cb", id="encoded-backslash"),
        pytest.param("/a%5Cb", id="encoded-backslash-upper"),
        pytest.param("/a\x00b", id="nul"),
        pytest.param("/a%00b", id="encoded-nul"),
        pytest.param("/a\nb", id="newline"),
        pytest.param("/a%0ab", id="encoded-newline"),
        pytest.param("/a\tb", id="tab"),
        pytest.param("/a\x7fb", id="del"),
        pytest.param("/a%7Fb", id="encoded-del"),
        pytest.param("/a;jsessionid=1", id="semicolon"),
        pytest.param("/a%3bb", id="encoded-semicolon"),
        pytest.param("/a/%252e%252e/b", id="double-encoding"),
        pytest.param("/a%25", id="encoded-percent"),
        pytest.param("/a%zz", id="malformed-escape"),
        pytest.param("/a%2", id="truncated-escape"),
        pytest.param("/a%", id="lone-percent"),
        pytest.param("/a%ff", id="invalid-utf8"),
        pytest.param("/a%c0%ae%c0%ae/b", id="overlong-utf8-dot"),
        pytest.param("search", id="relative"),
        pytest.param("", id="empty"),
        pytest.param("/" + "a" * 8192, id="8KiB"),
    ],
)
def test_an_ambiguous_path_is_refused(raw: str) -> None:
    with pytest.raises(RequestError):
        paths.normalize(raw)


def test_the_longest_accepted_path_is_4_KiB() -> None:
    longest = "/" + "a" * (paths.MAX_PATH_BYTES - 1)

    assert paths.normalize(longest) == longest
    with pytest.raises(RequestError, match="longer than"):
        paths.normalize(longest + "a")


def test_a_refused_path_is_a_bad_request() -> None:
    with pytest.raises(RequestError) as info:
        paths.normalize("/a/../b")

    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/search", "/search", True),
        ("/search", "/search/", False),
        ("/search", "/searches", False),
        ("/search", "/search/x", False),
        ("/search/*", "/search/lhr", True),
        ("/search/*", "/search", False),
        ("/search/*", "/search/lhr/jfk", False),
        ("/search/*/fares", "/search/lhr/fares", True),
        ("/search/*/fares", "/search/lhr/jfk/fares", False),
        ("/search/**", "/search", True),
        ("/search/**", "/search/", True),
        ("/search/**", "/search/lhr", True),
        ("/search/**", "/search/lhr/jfk/2026", True),
        ("/search/**", "/searching", False),
        ("/search/**", "/flights/search/x", False),
        ("/**/fares", "/fares", True),
        ("/**/fares", "/a/b/fares", True),
        ("/**/fares", "/a/b/fares/x", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/", "/", True),
        ("/", "/x", False),
        ("/v1.0/x", "/v1x0/x", False),
        ("/a+b/(c)", "/a+b/(c)", True),
        ("/a+b/(c)", "/aab/c", False),
        ("/files/", "/files/", True),
        ("/files/", "/files", False),
    ],
)
def test_globs_match_whole_segments(glob: str, path: str, matches: bool) -> None:
    assert paths.validate_glob(glob) is None
    assert paths.glob_matches(glob, path) is matches


def test_star_does_not_match_an_empty_trailing_segment() -> None:
    assert not paths.glob_matches("/users/*", "/users/")


@pytest.mark.parametrize(
    ("glob", "value", "matches"),
    [
        ("mcp.call", "mcp.call", True),
        ("mcp.*", "mcp.call", True),
        ("mcp.call", "mcp_call", False),
        ("mcp://flights/*", "mcp://flights/search", True),
        ("mcp://flights/*", "mcp://flights/a/b", False),
        ("mcp://flights/**", "mcp://flights/a/b", True),
        ("mcp://*/search", "mcp://payments/search", True),
        ("mcp://flights/*", "mcp://flights-evil/search", False),
    ],
)
def test_action_and_resource_globs(glob: str, value: str, matches: bool) -> None:
    assert paths.validate_name_glob(glob) is None
    assert paths.name_glob_matches(glob, value) is matches


PATH_ALPHABET = st.sampled_from(
    ["/", ".", "..", "a", "Z", "%", "%2e", "%2E", "%2f", "%5c", "%00", "%25", "%41", "%ff", "%c3%a9", "%zz",
     "\\", ";", "\x00", "\n", "é", "*", "?", "\ud800", " "]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(PATH_ALPHABET, max_size=20).map("".join), st.text(max_size=60)))
def test_normalize_accepts_only_unambiguous_paths_and_raises_nothing_else(raw: str) -> None:
    try:
        decoded = paths.normalize(raw)
    except RequestError:
        return
    segments = decoded.split("/")
    assert decoded.startswith("/")
    assert ".." not in segments
    assert "." not in segments
    assert "" not in segments[1:-1]
    assert "\\" not in decoded
    assert "\x00" not in decoded
    assert ";" not in decoded
    assert paths.normalize(decoded) == decoded, "a second decoding would read the path differently"

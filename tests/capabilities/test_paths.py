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
        ("/a/.hidden/b..c/..d/e..", "/a/.hidden/b..c/..d/e.."),
        ("/a%20b/c%20", "/a b/c "),
        ("/\uff41dmin", "/\uff41dmin"),
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
        pytest.param("/a/.../b", id="three-dots"),
        pytest.param("/a/...", id="trailing-three-dots"),
        pytest.param("/a/%20/b", id="space-segment"),
        pytest.param("/a/.%20./b", id="dot-space-dot"),
        pytest.param("/a/..%20/b", id="dot-dot-space"),
        pytest.param("/a/\uff0e\uff0e/b", id="fullwidth-dot-dot"),
        pytest.param("/a/%EF%BC%8E%EF%BC%8E/b", id="encoded-fullwidth-dot-dot"),
        pytest.param("/a/\u2025/b", id="two-dot-leader"),
        pytest.param("/a\uff0fb", id="fullwidth-slash"),
        pytest.param("/a\uff3cb", id="fullwidth-backslash"),
        pytest.param("/a%C2%85b", id="encoded-c1-next-line"),
        pytest.param("/a%E2%80%A8b", id="encoded-line-separator"),
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


# -- resource names: the same reader as paths ------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("mcp://payments/charge", "mcp://payments/charge"),
        ("file:///workspace/notes.txt", "file:///workspace/notes.txt"),
        ("file:///workspace/%73ecrets/key", "file:///workspace/secrets/key"),
        ("https://api.example.com", "https://api.example.com/"),
        ("https://api.example.com:8443/v1/", "https://api.example.com:8443/v1/"),
        ("/search", "/search"),
    ],
)
def test_a_resource_keeps_its_scheme_and_authority_and_normalizes_its_path(raw: str, normalized: str) -> None:
    assert paths.normalize_resource(raw) == normalized
    assert paths.normalize_resource(normalized) == normalized


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("file:///workspace/../etc/passwd", id="dot-dot"),
        pytest.param("file:///workspace/%2e%2e/etc/passwd", id="encoded-dot-dot"),
        pytest.param("file:///workspace/./secrets/key", id="dot"),
        pytest.param("file:///workspace//secrets", id="double-slash"),
        pytest.param("file:///workspace%2fsecrets", id="encoded-slash"),
        pytest.param("file:///workspace/a\x00b", id="nul"),
        pytest.param("file:///workspace/a%00b", id="encoded-nul"),
        pytest.param("file:///workspace/a\nb", id="newline"),
        pytest.param("file:///workspace/a%0Ab", id="encoded-newline"),
        pytest.param("file:///workspace/a\\b", id="backslash"),
        pytest.param("file:///workspace/.../b", id="three-dots"),
        pytest.param("file:///workspace/a?b", id="query"),
        pytest.param("file:///workspace/a#b", id="fragment"),
        pytest.param("mcp://pay%6dents/charge", id="encoded-authority"),
        pytest.param("mcp://payments\u00e9/charge", id="non-ascii-authority"),
        pytest.param("mcp:/payments/charge", id="scheme-without-authority"),
        pytest.param("urn:isbn:123", id="opaque-uri"),
        pytest.param("secrets/key", id="relative"),
        pytest.param("./secrets/key", id="dot-relative"),
        pytest.param("", id="empty"),
        pytest.param("mcp://x/" + "a" * 4096, id="too-long"),
    ],
)
def test_an_ambiguous_resource_is_refused(raw: str) -> None:
    with pytest.raises(RequestError):
        paths.normalize_resource(raw)


@pytest.mark.parametrize(
    ("glob", "resource", "matches"),
    [
        ("file:///workspace/**", "file:///workspace/a/b", True),
        ("file:///workspace/**", "file:///workspace", True),
        ("file:///workspace/**", "file:///etc/passwd", False),
        ("mcp://payments/*", "mcp://payments/charge", True),
        ("mcp://payments/*", "mcp://payments/a/b", False),
        ("mcp://payments/*", "mcp://payments/", False),
        ("mcp://*/search", "mcp://flights/search", True),
        ("mcp://*/search", "mcp:///search", False),
        ("mcp://payments/*", "mcp://payments-evil/charge", False),
        ("mcp://payments/charge", "mcp://PAYMENTS/charge", False),
        ("https://api.example.com/", "https://api.example.com/", True),
        ("/search/**", "/search/x", True),
    ],
)
def test_resource_globs_match_whole_segments(glob: str, resource: str, matches: bool) -> None:
    assert paths.validate_resource_glob(glob) is None
    assert paths.resource_glob_matches(glob, paths.normalize_resource(resource)) is matches


@pytest.mark.parametrize(
    ("glob", "problem"),
    [
        ("file:///workspace/../etc/**", "'..' segments"),
        ("file:///workspace//x", "empty segment"),
        ("file:///workspace/%2e%2e", "percent-encoding"),
        ("mcp://payments/get_*", "whole segments"),
        ("mcp://pay*/x", "authority"),
        ("m*p://payments/x", "resource is"),
        ("secrets/**", "resource is"),
        ("mcp://payments/x?y", "'?' and '#'"),
        ("", "1 to"),
    ],
)
def test_a_resource_glob_is_checked_with_the_same_rules(glob: str, problem: str) -> None:
    found = paths.validate_resource_glob(glob)
    assert found is not None and problem in found


# -- deny globs match leniently, allow globs exactly ------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["/admin/x", "/ADMIN/x", "/Admin/x", "/admin/", "/admin", "/admin./x", "/admin /x", "/admin. /x",
     "/\uff41\uff44\uff4d\uff49\uff4e/x", "/ad\u200bmin/x", "/admin\u3000/x", "/admin.json", "/ADMIN.JSON",
     "/admin::$DATA/x", "/admin.::$data/x"],
)
def test_a_deny_glob_matches_what_a_forgiving_router_would_route_there(path: str) -> None:
    assert paths.lenient_glob_matches("/admin/**", paths.normalize(path))


@pytest.mark.parametrize("path", ["/administrator/x", "/adm/x", "/x/admin", "/.admin/x", "/a/dmin"])
def test_a_deny_glob_still_needs_its_segments(path: str) -> None:
    assert not paths.lenient_glob_matches("/admin/**", path)


@pytest.mark.parametrize(("glob", "path"), [("/v1/charges", "/v1/charges/"), ("/v1/charges", "/V1/Charges"),
                                            ("/users/*/delete", "/users/7/delete.json"), ("/", "/"),
                                            ("/Admin/", "/admin")])
def test_deny_globs_fold_like_paths(glob: str, path: str) -> None:
    assert paths.lenient_glob_matches(glob, path)


@pytest.mark.parametrize(
    "resource",
    ["file:///workspace/secrets/key", "file:///workspace/SECRETS/key", "file:///workspace/secrets./key",
     "FILE:///workspace/secrets/key", "file:///workspace/secrets", "file:///workspace/secrets/"],
)
def test_a_deny_resource_glob_matches_leniently(resource: str) -> None:
    normalized = paths.normalize_resource(resource)
    assert paths.lenient_resource_glob_matches("file:///workspace/secrets/**", normalized)


@pytest.mark.parametrize("resource", ["mcp://payments/refund", "mcp://Payments/refund", "mcp://payments:443/refund",
                                      "mcp://agent@payments/refund", "mcp://payments./refund"])
def test_a_deny_resource_glob_reads_the_authority_as_a_host(resource: str) -> None:
    assert paths.lenient_resource_glob_matches("mcp://payments/refund", paths.normalize_resource(resource))
    assert paths.resource_glob_matches("mcp://*/refund", paths.normalize_resource(resource))
    assert not paths.lenient_resource_glob_matches("mcp://payments/refund", "mcp://pay/refund")


def test_action_deny_globs_ignore_case() -> None:
    assert paths.lenient_name_glob_matches("mcp.call", "MCP.Call")
    assert not paths.name_glob_matches("mcp.call", "MCP.Call")

"""Saved-weight names and tinker:// paths are whole-string matches: a trailing newline is not a name."""

from __future__ import annotations

import pytest

from api.tinker.services import NAME_RE, PATH_RE


@pytest.mark.parametrize("name", ["ckpt-1", "a.b_c", "x" * 100])
def test_names_taken(name):
    assert NAME_RE.match(name)


@pytest.mark.parametrize("name", ["ckpt-1\n", "", "-x", "a/b", "x" * 101, "a b"])
def test_names_refused(name):
    assert not NAME_RE.match(name)


def test_paths_end_where_the_name_ends():
    m = PATH_RE.match("tinker://run-1/weights/ckpt")
    assert m and (m["run"], m["kind"], m["name"]) == ("run-1", "weights", "ckpt")
    for bad in ("tinker://run-1/weights/ckpt\n", "tinker://run 1/weights/c", "tinker://r/other/c"):
        assert not PATH_RE.match(bad)

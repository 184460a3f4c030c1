import pytest

from wsae_core import profile


def test_default_profile_is_book(monkeypatch):
    monkeypatch.delenv("WSAE_PROFILE", raising=False)
    assert profile.current_profile() == "book"
    assert profile.pick(ci=1, book=2, paper=3) == 2


@pytest.mark.parametrize("name, expected", [("ci", 1), ("book", 2), ("paper", 3), (" CI ", 1)])
def test_pick_follows_environment(monkeypatch, name, expected):
    monkeypatch.setenv("WSAE_PROFILE", name)
    assert profile.pick(ci=1, book=2, paper=3) == expected


def test_paper_falls_back_to_book(monkeypatch):
    monkeypatch.setenv("WSAE_PROFILE", "paper")
    assert profile.pick(ci=1, book=2) == 2


def test_unknown_profile_names_the_value(monkeypatch):
    monkeypatch.setenv("WSAE_PROFILE", "huge")
    with pytest.raises(ValueError, match="'huge'"):
        profile.current_profile()
    with pytest.raises(ValueError, match="'tiny'"):
        profile.pick(ci=1, book=2, profile="tiny")

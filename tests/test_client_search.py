"""Blind-index tokens on the client: normalisation (French and English), key derivation,
tokens. Pure code."""

from __future__ import annotations

import unicodedata
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hoomi_client.keys import GroupKey
from hoomi_client.search import (
    MAX_TOKENS,
    message_tokens,
    query_tokens,
    search_key,
    token,
    words,
)

HOOMI = UUID("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
KEY = GroupKey("k1", bytes(range(32)))


@pytest.mark.parametrize("text, expected", [
    ("L'École d'été", ["ecole", "ete"]),
    ("Qu'est-ce qu'il y a ? Jusqu'à demain", ["est", "ce", "il", "demain"]),
    ("ÇA MARCHE, à tout à l’heure", ["ca", "marche", "tout", "heure"]),
    ("Naïve façade, cœur, Noël", ["naive", "facade", "cœur", "noel"]),
    ("John's café isn't open", ["john", "cafe", "isn", "open"]),
    ("The QUICK brown-fox, the quick!", ["the", "quick", "brown", "fox"]),
    ("ﬁne ＦＵＬＬ width ²", ["fine", "full", "width"]),
    ("Straße vs STRASSE", ["strasse", "vs"]),
    ("deploy v2.3 at 14h30 🚀 https://ex.org/a_b", ["deploy", "v2", "at", "14h30", "https",
                                                   "ex", "org"]),
    ("", []), ("a é 😀 !!", []),
])
def test_words_are_normalised_split_and_deduplicated(text: str, expected: list[str]) -> None:
    assert words(text) == expected


def test_the_same_word_in_any_case_or_accent_gives_one_token() -> None:
    skey = search_key(KEY, HOOMI)
    forms = ["École", "ecole", "ÉCOLE", "e\u0301cole", "l'école", "L’ECOLE"]
    assert {message_tokens(skey, f) for f in forms} == {(token(skey, "ecole"),)}


def test_search_key_depends_on_key_hoomi_and_session_and_is_not_the_key() -> None:
    a = search_key(KEY, HOOMI)
    assert len(a) == 32 and a != KEY.key
    assert a != search_key(KEY, uuid4())
    assert a != search_key(GroupKey("k2", KEY.key), HOOMI)
    assert a != search_key(GroupKey("k1", bytes(32)), HOOMI)
    assert a == search_key(GroupKey("k1", bytes(range(32))), HOOMI)  # every member agrees


def test_tokens_are_16_bytes_at_most_64_per_message_and_queries_at_most_8() -> None:
    skey = search_key(KEY, HOOMI)
    many = " ".join(f"word{i}" for i in range(100))
    toks = message_tokens(skey, many)
    assert len(toks) == MAX_TOKENS and all(len(t) == 16 for t in toks)
    assert len(query_tokens(skey, "deux mots")) == 2
    with pytest.raises(ValueError):
        query_tokens(skey, " ".join(f"w{i}" for i in range(9)))
    with pytest.raises(ValueError):
        query_tokens(skey, "! ?")


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)


@given(text)
def test_normalising_is_idempotent(t: str) -> None:
    ws = words(t)
    assert words(" ".join(ws)) == ws
    assert all(w == unicodedata.normalize("NFKC", w) and w == w.casefold() for w in ws)


@given(text)
def test_case_and_accents_never_change_the_tokens(t: str) -> None:
    skey = search_key(KEY, HOOMI)
    decomposed = unicodedata.normalize("NFD", t)
    assert message_tokens(skey, t.upper().lower()) == message_tokens(skey, t.lower())
    assert set(words(decomposed)) == set(words(t))


@given(st.lists(st.sampled_from(["réunion", "demain", "deploy", "release", "café", "été"]),
                min_size=1, max_size=6))
def test_a_message_matches_a_query_of_any_of_its_words(ws: list[str]) -> None:
    skey = search_key(KEY, HOOMI)
    stored = set(message_tokens(skey, "Re: " + " ".join(ws).upper() + " !"))
    assert set(query_tokens(skey, " ".join(reversed(ws)))) <= stored

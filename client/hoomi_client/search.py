"""Blind-index search tokens, computed on the client (SPEC §7.2; docs/encryption.md).

The hub stores, with each message, a set of opaque tokens and answers "which messages
carry all of these tokens"; it never sees a word. A token is

    HMAC-SHA256(search_key, normalised word)[:16]

where `search_key` = HKDF-SHA256(ikm = the Hoomi's group key, salt = hoomi_id (16 bytes),
info = b"hoomi/search/v1" + session_id): every member holding the key derives the same
key, it is unrelated to the encryption key itself, and different Hoomis (or key
sessions) give unrelated tokens for the same word.

Normalisation (`words`), the same for indexing and for queries, so that "École",
"ecole" and "ÉCOLE" meet:
1. Unicode NFKC (compatibility forms: ﬁ → fi, full-width letters, superscripts);
2. case folding (str.casefold: ß → ss, final sigma);
3. accents removed: NFD, then every combining mark (category Mn) dropped: é → e, then
   NFKC and case folding again (what is left composes back: Hangul syllables);
4. word splitting on anything that is not a letter or a digit (Unicode \\w without
   the underscore), apostrophes included, after dropping French elisions (l', d', j',
   qu', n', s', c', m', t', jusqu', lorsqu', puisqu') and the English possessive 's;
5. words of one character are dropped (mostly noise), words longer than 64 characters
   are cut to 64; repeats count once. At most MAX_TOKENS words of a message are
   indexed (the first ones), which is also the hub's limit.

What the hub learns from tokens (equality, frequency, co-occurrence) and how a client
limits it: docs/encryption.md, "Search".
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from uuid import UUID

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hoomi_protocol.limits import DEFAULT_LIMITS

from .keys import GroupKey

TOKEN_BYTES = 16
MAX_TOKENS = DEFAULT_LIMITS.max_search_tokens_per_message  # 64 per message
MAX_QUERY_TOKENS = DEFAULT_LIMITS.max_search_tokens_per_query  # 8 per search
MAX_WORD_CHARS = 64
INFO = b"hoomi/search/v1"

_ELISION = re.compile(r"\b(?:jusqu|lorsqu|puisqu|qu|[ldjnscmt])['’]", re.IGNORECASE)
_POSSESSIVE = re.compile(r"['’]s\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+")


def search_key(key: GroupKey, hoomi_id: UUID) -> bytes:
    """The Hoomi's search key for this group key (HKDF-SHA256, 32 bytes)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=hoomi_id.bytes,
                info=INFO + key.session_id.encode("utf-8")).derive(key.key)


def _strip_accents(text: str) -> str:
    """Drop combining marks, then compose again (Hangul and the like come back whole)."""
    bare = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFKC", bare).casefold()


def words(text: str) -> list[str]:
    """The normalised words of a text, in order of first appearance, each once."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _POSSESSIVE.sub(" ", _ELISION.sub(" ", text))
    text = _strip_accents(text)
    seen: dict[str, None] = {}
    for w in _WORD.findall(text):
        if len(w) > 1:
            seen.setdefault(w[:MAX_WORD_CHARS], None)
    return list(seen)


def token(skey: bytes, word: str) -> bytes:
    return hmac.new(skey, word.encode("utf-8"), hashlib.sha256).digest()[:TOKEN_BYTES]


def message_tokens(skey: bytes, text: str) -> tuple[bytes, ...]:
    """The tokens to send with a message: one per distinct word, at most MAX_TOKENS."""
    return tuple(token(skey, w) for w in words(text)[:MAX_TOKENS])


def query_tokens(skey: bytes, text: str) -> tuple[bytes, ...]:
    """The tokens of a search: every word must match. ValueError for no word or too
    many (the hub takes at most MAX_QUERY_TOKENS)."""
    ws = words(text)
    if not ws:
        raise ValueError("search: no word to look for (words of 2 characters or more)")
    if len(ws) > MAX_QUERY_TOKENS:
        raise ValueError(f"search: at most {MAX_QUERY_TOKENS} words")
    return tuple(token(skey, w) for w in ws)

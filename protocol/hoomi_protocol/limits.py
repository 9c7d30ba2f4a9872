"""The limits of protocol v1, in one place (each is documented in docs/protocol.md).

Invariant: `decode_client` never accepts a field beyond these limits, and a frame that
passes `max_frame_bytes` cannot make the decoder allocate more than a small multiple of
its own size.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_OVERHEAD = 4096  # room for the other fields of a `send` around its content
# A reencrypt frame has the same bound: a client packs its items up to max_frame_bytes.


@dataclass(frozen=True, slots=True)
class Limits:
    max_content_bytes: int = 65536
    min_content_bytes: int = 16  # the AES-GCM tag alone
    nonce_bytes: int = 12
    max_session_id_chars: int = 128
    max_ref_chars: int = 64
    max_page_limit: int = 100
    default_page_limit: int = 50
    max_resume_hoomis: int = 1000
    max_token_chars: int = 8192  # a JWT with a few claims is a few hundred characters
    max_scheme: int = 255
    max_search_tokens_per_message: int = 64  # send/edit `tokens`
    max_search_tokens_per_query: int = 8  # search `tokens`
    search_token_bytes: tuple[int, int] = (8, 32)
    max_reencrypt_items: int = 100
    max_features: int = 16  # hello `features` (v1.1): names of 1-32 characters
    max_feature_chars: int = 32
    # Values nest at most 1024 levels deep (msgpack's own stack, not configurable). The
    # only arrays a client frame holds are `tokens` (of bin), `items` (of maps) and
    # `features` (of str); the
    # decoder builds them only under those keys and within these bounds, and skips any
    # other array unbuilt, whatever its length (see codec._unpack_client).

    @property
    def max_frame_bytes(self) -> int:
        return self.max_content_bytes + FRAME_OVERHEAD


DEFAULT_LIMITS = Limits()

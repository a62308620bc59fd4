"""The registry of self-supervised methods: their names, in the order the API and the CLI list them.

One list, read by the API schema (``PretrainingRequest.method``, an OpenAPI enum), ``cxrsynth pretrain
--method`` and :class:`models.ssl.config.PretrainConfig`; :data:`models.ssl.training.SSL_METHODS` maps
each name to its implementation (a test keeps the two equal). Light (no torch: ``models.ssl`` imports
it), like :mod:`models.generator_kinds`, so the API reads it without loading the ML stack. An unknown name
fails loudly; it never falls back to another method.
"""

from __future__ import annotations

from typing import Literal, get_args

SSL_METHOD_NAMES: tuple[str, ...] = ("dino", "simclr")

# For typing only; the check below keeps it equal to the registry.
SSLMethod = Literal["dino", "simclr"]
DEFAULT_SSL_METHOD: SSLMethod = "dino"
if get_args(SSLMethod) != SSL_METHOD_NAMES or DEFAULT_SSL_METHOD not in SSL_METHOD_NAMES:
    raise RuntimeError(f"models.ssl_methods: the SSLMethod literal {get_args(SSLMethod)} differs from "
                       f"SSL_METHOD_NAMES {SSL_METHOD_NAMES} (or the default is not in it)")


def check_ssl_method(name: str) -> str:
    """``name`` if it is a known SSL method; ``ValueError`` naming the known ones otherwise."""
    if name not in SSL_METHOD_NAMES:
        raise ValueError(f"method must be {' or '.join(repr(m) for m in SSL_METHOD_NAMES)}, got {name!r}")
    return name

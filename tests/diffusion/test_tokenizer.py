"""Our CLIP tokenizer against hand-checked ids and against transformers' tokenizer built offline."""

import gzip
import html
import json
import random
from importlib import resources

import pytest

from diffusion.text.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def reference_byte_chars() -> list[str]:
    """GPT-2/CLIP byte order written out independently: printable latin-1 first, the rest shifted past 255."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return [chars[b] for b in keep + others]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    raw = resources.files("diffusion").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 1 + 48894]
    byte_chars = reference_byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert hf("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    return hf


def test_vocabulary_size_and_specials(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.bos_id == 49406 and tokenizer.eos_id == 49407
    assert tokenizer.vocab[49406] == "<|startoftext|>" and tokenizer.vocab[49407] == "<|endoftext|>"
    assert tokenizer.vocab[256] == "!</w>"


def test_known_ids(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("a photo of a cat"), tokenizer.eos_id]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cleaning(tokenizer):
    assert tokenizer.encode("A  PHOTO\n\tof a Cat") == tokenizer.encode("a photo of a cat")
    assert tokenizer.encode("cats &amp; dogs") == tokenizer.encode("cats & dogs")
    assert tokenizer.encode("") == [] and tokenizer.encode("   \n") == []


def test_decode_round_trip(tokenizer):
    text = "a portrait of a woman, 8k, highly detailed! don't stop"
    expected = "a portrait of a woman , 8 k , highly detailed ! don 't stop"
    assert tokenizer.decode(tokenizer.encode(text)) == expected
    assert tokenizer.decode(tokenizer.encode("héllo 日本語 🙂")) == "héllo 日本語 🙂"
    with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
        tokenizer.decode([49408])


def test_cache_is_bounded():
    small = CLIPTokenizer(cache_size=3)
    first = small.encode("alpha beta gamma delta epsilon zeta")
    assert len(small.cache) <= 3
    assert small.encode("alpha beta gamma delta epsilon zeta") == first


def varied_strings() -> list[str]:
    fixed = [
        "a photo of a cat",
        "masterpiece, best quality, (detailed:1.2)",
        "don't won't I'm we're they've you'll he'd",
        "1234567890 3.14159 1e-5 0x1F",
        "!!!???...,,,;;:::--__==++",
        "héllo wörld ßtraße naïve café",
        "日本語のテキスト 中文 한국어",
        "emoji 🙂🚀🐱 mixed",
        "supercalifragilisticexpialidocious" * 3,
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "trailing space ",
        "\tleading tab",
        "UPPER lower MiXeD",
        "a" * 200,
        "e\u0301 decomposed accent",
        "quotes \"double\" 'single' `back`",
        "<|endoftext|> in text",
        "url https://example.com/path?q=1&x=2",
        "under_score snake_case camelCase",
        "$100 €50 £20 ¥1000",
        "line\nbreak\r\nwindows",
        "ALL-CAPS HYPHEN-ATED",
        "x'sx'tx'rex",
        "'s 't 're 've 'm 'll 'd",
        "''''",
        "",
    ]
    rng = random.Random(1234)
    pools = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%()*+,-./:<=>?@[]^_{|}~",
        "'''",
        "     \t\n",
        "éèêëàâäôöûüçñßøåæœ",
        "日本語中文한국어αβγδжщ",
        "🙂🚀🐱✨❤",
        "—–…«»“”‘’",
    ]
    randomised = []
    for _ in range(300):
        length = rng.randint(1, 60)
        randomised.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return fixed + randomised


def test_agrees_with_transformers(tokenizer, hf_tokenizer):
    strings = varied_strings()
    assert len(strings) > 300
    mismatches = []
    for text in strings:
        ours = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        theirs = hf_tokenizer(html.unescape(html.unescape(text)))["input_ids"]
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    assert not mismatches, mismatches[:5]

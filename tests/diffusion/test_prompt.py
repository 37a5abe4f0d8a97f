"""Prompt weighting, chunking and textual-inversion embeddings, against hand-computed expectations."""

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.text.embeddings import EmbeddingError, load_embedding, resolve_embedding
from diffusion.text.prompt import PromptTokenizer, chunk_groups, parse_prompt_weights
from diffusion.text.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
CAT, DOG, COMMA = 2368, 1929, 267
XYZZYQ = [20023, 21275, 336]  # a 3-token word
LONG_WORD = "supercalifragilisticexpialidocious"  # 9 tokens


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def rounded(pairs):
    return [(text, round(weight, 6)) for text, weight in pairs]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("(word)", [("word", 1.1)]),
        ("((word))", [("word", 1.21)]),
        ("(((word)))", [("word", 1.331)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("((a:1.3))", [("a", 1.3)]),
        ("((a:0.5) b)", [("a", 0.5), (" b", 1.1)]),
        ("x (a (b:1.5) c) y", [("x ", 1.0), ("a ", 1.1), ("b", 1.5), (" c", 1.1), (" y", 1.0)]),
        ("(a:b:2)", [("a:b", 2.0)]),
        ("(a:x)", [("a:x", 1.1)]),
        ("(:1.2)", [(":1.2", 1.1)]),
        ("\\(literal\\)", [("(literal)", 1.0)]),
        ("(\\(x\\):1.4)", [("(x)", 1.4)]),
        ("[square] brackets", [("[square] brackets", 1.0)]),
        ("a)b(c", [("a)b(c", 1.0)]),
        ("(a", [("(a", 1.0)]),
        ("((a)", [("(a", 1.1)]),
        ("a) (b)", [("a) (b)", 1.0)]),
        ("()", []),
        ("", []),
    ],
)
def test_weight_parsing(text, expected):
    assert rounded(parse_prompt_weights(text)) == expected


def ids(chunk):
    return [slot for slot, _ in chunk]


def test_hundred_tokens_make_two_chunks(tokenizer):
    for pad in (EOS, 0):
        chunks = PromptTokenizer(tokenizer, pad, 8)(" ".join(["cat"] * 100))
        assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
        assert ids(chunks[0]) == [BOS, *[CAT] * 75, EOS]
        assert ids(chunks[1]) == [BOS, *[CAT] * 25, EOS, *[pad] * 50]


def test_empty_prompt_is_one_padded_chunk(tokenizer):
    assert [ids(c) for c in PromptTokenizer(tokenizer, EOS, 8)("")] == [[BOS, EOS, *[EOS] * 75]]
    assert [ids(c) for c in PromptTokenizer(tokenizer, 0, 8)("  ")] == [[BOS, EOS, *[0] * 75]]


def test_group_moves_whole_to_next_chunk(tokenizer):
    # ComfyUI today: the text of one weighted fragment is one group; a short group moves whole
    chunks = PromptTokenizer(tokenizer, 0, 8)(" ".join(["cat"] * 74) + " (xyzzyq:1.2) dog")
    assert ids(chunks[0]) == [BOS, *[CAT] * 74, EOS, 0]
    assert chunks[1][:6] == [(BOS, 1.0), *[(i, 1.2) for i in XYZZYQ], (DOG, 1.0), (EOS, 1.0)]
    assert ids(chunks[1])[6:] == [0] * 71


def test_long_fragment_is_split_at_the_chunk_end(tokenizer):
    chunks = PromptTokenizer(tokenizer, 0, 8)(" ".join(["cat"] * 74) + " xyzzyq dog")
    assert ids(chunks[0]) == [BOS, *[CAT] * 74, XYZZYQ[0], EOS]
    assert ids(chunks[1])[:5] == [BOS, *XYZZYQ[1:], DOG, EOS]


def test_split_words_keeps_each_word_whole(tokenizer):
    chunks = PromptTokenizer(tokenizer, 0, 8, split_words=True)(" ".join(["cat"] * 74) + " xyzzyq dog")
    assert ids(chunks[0]) == [BOS, *[CAT] * 74, EOS, 0]
    assert ids(chunks[1]) == [BOS, *XYZZYQ, DOG, EOS, *[0] * 71]


@pytest.mark.parametrize("split_words", [False, True])
def test_long_word_is_split(tokenizer, split_words):
    long_ids = tokenizer.encode(LONG_WORD)
    assert len(long_ids) == 9
    prompt = PromptTokenizer(tokenizer, 0, 8, split_words=split_words)
    chunks = prompt(" ".join(["cat"] * 70) + " (" + LONG_WORD + ")")
    assert ids(chunks[0]) == [BOS, *[CAT] * 70, *long_ids[:5], EOS]
    assert ids(chunks[1])[:6] == [BOS, *long_ids[5:], EOS]


def test_exactly_full_chunk_has_no_trailing_empty_chunk():
    group = [(1, 1.0)] * 75
    assert len(chunk_groups([group], BOS, EOS, 0)) == 1
    assert len(chunk_groups([group, [(2, 1.0)]], BOS, EOS, 0)) == 2


def test_weights_follow_tokens(tokenizer):
    (chunk,) = PromptTokenizer(tokenizer, EOS, 8)("(cat:1.5) ((dog)), xyzzyq")
    assert chunk[:8] == [
        (BOS, 1.0), (CAT, 1.5), (DOG, pytest.approx(1.21)), (COMMA, 1.0),
        *[(i, 1.0) for i in XYZZYQ], (EOS, 1.0),
    ]
    assert chunk[8:] == [(EOS, 1.0)] * 69


# --- embeddings -------------------------------------------------------------------------------------------


def vectors(n, width, seed):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def embedding_dir(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(2, 8, 1)}, "name": "a1111"},
               folder / "a1111.pt")
    save_file({"emb_params": vectors(3, 8, 2)}, folder / "st.safetensors")
    save_file({"clip_l": vectors(1, 8, 3), "clip_g": vectors(2, 12, 4)}, folder / "xl.safetensors")
    torch.save(vectors(2, 8, 5), folder / "bare.pt")
    torch.save({"<token>": vectors(1, 8, 6)[0]}, folder / "diffusers.bin")
    (folder / "sub").mkdir()
    save_file({"emb_params": vectors(1, 8, 7)}, folder / "sub" / "nested.safetensors")
    return folder


@pytest.mark.parametrize(
    ("name", "width", "seed", "rows"),
    [("a1111", 8, 1, 2), ("a1111.pt", 8, 1, 2), ("st", 8, 2, 3), ("xl", 8, 3, 1), ("xl", 12, 4, 2),
     ("bare", 8, 5, 2), ("diffusers", 8, 6, 1), ("sub/nested", 8, 7, 1)],
)
def test_embedding_formats(embedding_dir, name, width, seed, rows):
    loaded = load_embedding(name, [embedding_dir], width)
    expected = vectors(rows, width, seed) if name != "diffusers" else vectors(1, 8, 6)[:1]
    assert loaded is not None and torch.equal(loaded, expected[:rows])


def test_sdxl_file_entry_chosen_by_encoder_name(embedding_dir):
    save_file({"clip_l": vectors(1, 8, 10), "clip_g": vectors(2, 8, 11)}, embedding_dir / "same.safetensors")
    assert torch.equal(load_embedding("same", [embedding_dir], 8, key="clip_g"), vectors(2, 8, 11))
    assert torch.equal(load_embedding("same", [embedding_dir], 8, key="clip_l"), vectors(1, 8, 10))


def test_embedding_of_wrong_width_is_skipped_with_warning(embedding_dir, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_embedding("st", [embedding_dir], 12) is None
    assert "st" in caplog.text and "width 12" in caplog.text


def test_embedding_slots_in_chunks(tokenizer, embedding_dir):
    prompt = PromptTokenizer(tokenizer, 0, 8, [embedding_dir])
    (chunk,) = prompt("cat (embedding:a1111, dog:1.2)")
    expected_vectors = vectors(2, 8, 1)
    assert [s for s, _ in chunk[:2]] == [BOS, CAT]
    assert torch.equal(chunk[2][0], expected_vectors[0]) and torch.equal(chunk[3][0], expected_vectors[1])
    assert [w for _, w in chunk[2:4]] == [1.2, 1.2]
    assert chunk[4:7] == [(COMMA, 1.2), (DOG, 1.2), (EOS, 1.0)]
    assert chunk[7:] == [(0, 1.0)] * 70


def test_missing_embedding_warns_and_is_skipped(tokenizer, embedding_dir, caplog):
    prompt = PromptTokenizer(tokenizer, 0, 8, [embedding_dir])
    with caplog.at_level(logging.WARNING):
        (chunk,) = prompt("cat embedding:nosuchthing dog")
    assert "nosuchthing" in caplog.text
    assert ids(chunk)[:4] == [BOS, CAT, DOG, EOS]
    (chunk,) = prompt("cat embedding:nosuchthing, dog")
    assert ids(chunk)[:5] == [BOS, CAT, COMMA, DOG, EOS]


@pytest.mark.parametrize("split_words", [False, True])
def test_embedding_in_running_text(tokenizer, embedding_dir, split_words, caplog):
    prompt = PromptTokenizer(tokenizer, 0, 8, [embedding_dir], split_words=split_words)
    with caplog.at_level(logging.WARNING):
        (chunk,) = prompt("cat\nembedding:st dog,embedding:st")
    assert not caplog.text
    assert ids(chunk)[:1] == [BOS] and chunk[1][0] == CAT
    assert all(torch.equal(chunk[2 + i][0], vectors(3, 8, 2)[i]) for i in range(3))
    tail = [DOG, *tokenizer.encode(",embedding:st"), EOS]  # not at a word start: plain text
    assert ids(chunk)[5 : 5 + len(tail)] == tail and ids(chunk)[5 + len(tail) :] == [0] * (72 - len(tail))


def test_traversal_is_refused(tokenizer, embedding_dir, tmp_path):
    secret = tmp_path / "secret.safetensors"
    save_file({"emb_params": vectors(1, 8, 9)}, secret)
    os.symlink(secret, embedding_dir / "link.safetensors")
    for name in ("../secret", "../secret.safetensors", str(secret), "sub/../../secret", "link"):
        with pytest.raises(EmbeddingError, match="embedding name"):
            resolve_embedding(name, [embedding_dir])
    with pytest.raises(EmbeddingError):
        PromptTokenizer(tokenizer, 0, 8, [embedding_dir])("a embedding:../secret")
    assert resolve_embedding("sub/../st", [embedding_dir]) == embedding_dir / "sub/../st.safetensors"


def write_marker(path):
    Path(path).write_text("code ran")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return write_marker, (str(self.marker),)


def test_pickle_needing_code_is_refused_and_not_run(embedding_dir, tmp_path):
    marker = tmp_path / "marker.txt"
    torch.save({"string_to_param": {"*": Payload(marker)}}, embedding_dir / "evil.pt")
    with pytest.raises(EmbeddingError, match="refused"):
        load_embedding("evil", [embedding_dir], 8)
    assert not marker.exists()
    torch.load(embedding_dir / "evil.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "code ran"


def test_unknown_layout_is_a_clear_error(embedding_dir):
    save_file({"a": vectors(1, 8, 0), "b": vectors(1, 8, 0)}, embedding_dir / "two.safetensors")
    with pytest.raises(EmbeddingError, match="no embedding vectors found"):
        load_embedding("two", [embedding_dir], 8)

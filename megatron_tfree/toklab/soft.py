"""Soft tokenizer: a small byte-level transformer that predicts a token's embedding row from its bytes.

    result = train_soft(token_bytes, table, SoftConfig(losses=("mse", "retrieval")))
    result.heldout_accuracy                    # retrieval accuracy on tokens never trained on
    rows = result.predict([b" hello", b"xyz"])  # [2, h] in the table's scale
    save(result, "soft/"); encoder = load("soft/")
    result, report = soft_from_checkpoint("runs/bpe", cfg, eval_texts=texts)  # + bits per byte

Input: the UTF-8 bytes of each token as ``BOS bytes EOS`` (ids 0..255 the bytes, ``BOS`` = 256,
``EOS`` = 257), padded with ``PAD`` = 258 to the longest token (:func:`encode_bytes`). The
:class:`ByteEncoder` embeds them (byte embedding + learned positions), runs a bidirectional
``nn.TransformerEncoder`` (pre-norm, padding masked out), takes the mean over the non-padding positions
(markers included) and maps it through LayerNorm + Linear to the model's hidden size.

Targets: the rows of the embedding table ``E [V, h]``, divided by the table's global standard deviation
``s`` (so the losses are scale-free; :meth:`ByteEncoder.embed` multiplies by ``s`` again). Losses
(weighted sum, :class:`SoftConfig`), with ``p`` the prediction and ``e`` the target, both scaled:

* ``mse``: mean of ``(p - e)^2`` over the elements; ``l1``: mean of ``|p - e|``;
* ``retrieval``: cross-entropy of the logits ``p . E_j / (h * temperature)`` over ALL ``V`` rows
  ``j`` of the scaled table against the token's own id. Plain dot products, as the accuracy below;
  the scaled rows have a squared norm of about ``h``, so a perfect prediction's own logit is about
  ``1 / temperature``. Held-out rows are distractors but never targets.

A seeded share ``holdout`` of the ids never contributes a training target. Retrieval accuracy
(:func:`retrieval_accuracy`) = share of tokens ``i`` with ``argmax_j p_i . E_j == i``, reported on
held-out tokens and on (a seeded sample of) training tokens; chance is ``1 / V``.

:func:`soft_from_checkpoint` does this for a classic checkpoint's input embedding (T-Free has no
vocabulary tokens) and, given texts, reports their bits per byte with the original embedding and with
every row (or only the held-out rows) replaced by the prediction.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

BOS, EOS, PAD = 256, 257, 258
BYTE_VOCAB = 259
LOSSES = ("mse", "l1", "retrieval")
SCHEDULES = ("cosine", "constant")
ENCODER_FILE = "soft_encoder.safetensors"
META_FILE = "soft.json"
FORMAT = "megatron_tfree.toklab.soft"


def encode_bytes(tokens: Sequence[bytes], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, L] long, padding mask [N, L] bool, True = padding)``: each token as ``BOS bytes EOS``
    padded with ``PAD``; ``L`` = longest token + 2, or ``max_len`` (a longer token is an error)."""
    longest = max((len(t) for t in tokens), default=0)
    if max_len is None:
        max_len = longest + 2
    elif longest > max_len - 2:
        token = next(t for t in tokens if len(t) > max_len - 2)
        raise ValueError(f"token {token!r} has {len(token)} bytes; at most {max_len - 2} fit max_len={max_len} "
                         f"(BOS and EOS take 2)")
    ids = torch.full((len(tokens), max_len), PAD, dtype=torch.long)
    for i, token in enumerate(tokens):
        n = len(token)
        ids[i, 0] = BOS
        if n:
            ids[i, 1 : n + 1] = torch.frombuffer(bytearray(token), dtype=torch.uint8).long()
        ids[i, n + 1] = EOS
    return ids, ids == PAD


@dataclass
class SoftConfig:
    """Encoder size, losses and training of the soft tokenizer (see the module docstring)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    losses: tuple[str, ...] = ("mse", "retrieval")
    weights: tuple[float, ...] | None = None  # one per loss (default 1 each)
    temperature: float = 0.1  # retrieval: logits = p . E_j / (h * temperature)
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    schedule: str = "cosine"  # linear warmup, then cosine to lr/10 ("cosine") or constant
    warmup: int = 100
    holdout: float = 0.1  # share of the vocabulary held out
    seed: int = 0
    log_every: int = 50  # history entry every this many steps (means over them), and the last step
    accuracy_sample: int = 4096  # training ids scored for train_accuracy (seeded sample; 0 = all)

    def __post_init__(self) -> None:
        self.losses = tuple(self.losses)
        if not self.losses:
            raise ValueError(f"losses: give at least one of {', '.join(LOSSES)}")
        for name in self.losses:
            if name not in LOSSES:
                raise ValueError(f"losses: unknown loss {name!r}; known: {', '.join(LOSSES)}")
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"losses: {self.losses} names a loss twice")
        if self.weights is not None:
            self.weights = tuple(float(w) for w in self.weights)
            if len(self.weights) != len(self.losses):
                raise ValueError(f"weights: {len(self.weights)} given for {len(self.losses)} losses {self.losses}")
            if any(not (w >= 0 and math.isfinite(w)) for w in self.weights) or not any(self.weights):
                raise ValueError(f"weights must be finite, >= 0 and not all 0, got {self.weights}")
        for name in ("hidden", "layers", "heads", "steps", "batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        for name in ("warmup", "accuracy_sample", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown {self.schedule!r}; known: {', '.join(SCHEDULES)}")

    def loss_weights(self) -> dict[str, float]:
        return dict(zip(self.losses, self.weights or (1.0,) * len(self.losses)))

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        warm = min(self.warmup, self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "constant":
            return self.lr
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class ByteEncoder(nn.Module):
    """Token bytes -> a row in the (scaled) embedding space: byte embedding + learned positions, a
    bidirectional pre-norm transformer encoder with padding masked out, the mean over the non-padding
    positions, LayerNorm, Linear to ``out_dim``. ``scale`` (a buffer, saved with the weights) maps
    :meth:`forward`'s output to the table's scale (:meth:`embed`). Weights depend only on ``seed``."""

    def __init__(self, out_dim: int, max_len: int, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        if out_dim < 1 or max_len < 2:
            raise ValueError(f"out_dim must be >= 1 and max_len >= 2, got {out_dim}, {max_len}")
        self.out_dim, self.max_len, self.hidden, self.layers, self.heads = out_dim, max_len, hidden, layers, heads
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.bytes = nn.Embedding(BYTE_VOCAB, hidden)
            self.positions = nn.Parameter(torch.randn(max_len, hidden) * 0.02)
            layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, out_dim)
        self.register_buffer("scale", torch.ones(()))

    def arch(self) -> dict[str, int]:
        """The constructor arguments but the seed (what :func:`load` rebuilds from)."""
        return {"out_dim": self.out_dim, "max_len": self.max_len, "hidden": self.hidden, "layers": self.layers,
                "heads": self.heads}

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` byte ids and padding mask (``L <= max_len``) -> ``[N, out_dim]`` (scaled space)."""
        L = ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"{L} byte positions; this encoder takes at most max_len={self.max_len}")
        h = self.bytes(ids) + self.positions[:L]
        h = self.encoder(h, src_key_padding_mask=pad_mask)
        keep = (~pad_mask).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.out(self.norm(pooled))

    @torch.no_grad()
    def embed(self, token_bytes: Sequence[bytes], batch_size: int = 1024) -> torch.Tensor:
        """Predicted rows ``[N, out_dim]`` in the table's scale (eval mode, in batches)."""
        was_training = self.training
        self.eval()
        device = self.scale.device
        out = []
        try:
            for s in range(0, len(token_bytes), batch_size):
                ids, mask = encode_bytes(token_bytes[s : s + batch_size], self.max_len)
                ids, mask = _trim(ids, mask)
                out.append(self(ids.to(device), mask.to(device)) * self.scale)
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.out_dim, device=device)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row (the output does not change)."""
    L = int((~mask).sum(1).max()) if len(ids) else 2
    return ids[:, :L], mask[:, :L]


def retrieval_accuracy(pred: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> float:
    """Share of rows ``i`` with ``argmax_j pred[i] . table[j] == ids[i]`` (``pred [N, h]``, ``table [V, h]``,
    ``ids [N]``); NaN for no rows."""
    if len(ids) == 0:
        return float("nan")
    if len(pred) != len(ids):
        raise ValueError(f"{len(pred)} predictions for {len(ids)} ids")
    table = table.to(pred.device, torch.float32)
    ids = ids.to(pred.device)
    hits = 0
    for s in range(0, len(ids), chunk):
        hits += int((pred[s : s + chunk].float() @ table.T).argmax(1).eq(ids[s : s + chunk]).sum())
    return hits / len(ids)


@dataclass
class SoftResult:
    """A trained soft tokenizer and how well it retrieves its own tokens."""

    encoder: ByteEncoder
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    history: list[dict[str, float]]
    train_accuracy: float
    heldout_accuracy: float
    config: SoftConfig = field(default_factory=SoftConfig)
    vocab_size: int = 0
    seconds: float = 0.0

    def predict(self, token_bytes: Sequence[bytes]) -> torch.Tensor:
        """Predicted embedding rows ``[N, out_dim]`` in the table's scale."""
        return self.encoder.embed(token_bytes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (NaN accuracies as null)."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"vocab_size": self.vocab_size, "out_dim": self.encoder.out_dim, "train_tokens": len(self.train_ids),
                "heldout_tokens": len(self.heldout_ids), "train_accuracy": num(self.train_accuracy),
                "heldout_accuracy": num(self.heldout_accuracy),
                "chance_accuracy": 1.0 / self.vocab_size if self.vocab_size else None,
                "losses": self.history[-1] if self.history else {}, "steps": self.config.steps,
                "seconds": round(self.seconds, 2)}


def split_ids(vocab_size: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train ids, held-out ids)``, both sorted: a seeded permutation's first ``round(holdout * V)`` ids
    (at least 1 when ``holdout > 0`` and ``V > 1``, at most ``V - 1``) are held out."""
    n = round(holdout * vocab_size)
    if holdout > 0 and vocab_size > 1:
        n = min(max(n, 1), vocab_size - 1)
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    return perm[n:].sort().values, perm[:n].sort().values


def train_soft(token_bytes: Sequence[bytes], table: torch.Tensor, cfg: SoftConfig, progress: bool = False,
               device: str | torch.device = "cpu") -> SoftResult:
    """Train a :class:`ByteEncoder` to predict ``table[i]`` from ``token_bytes[i]`` (see the module docstring)."""
    from tqdm import tqdm

    V = len(token_bytes)
    if table.ndim != 2 or table.shape[0] != V:
        raise ValueError(f"table must be [V, h] with V = {V} tokens, got {list(table.shape)}")
    if V < 1:
        raise ValueError("no tokens")
    start = time.perf_counter()
    device = torch.device(device)
    target = table.detach().to(device, torch.float32)
    if not bool(torch.isfinite(target).all()):
        raise ValueError("the table has non-finite values")
    scale = target.std() if target.numel() > 1 else target.abs().max()
    if not float(scale) > 0:
        raise ValueError("the table is constant (standard deviation 0): nothing to predict")
    target = target / scale
    h = target.shape[1]
    weights = cfg.loss_weights()

    all_ids, all_mask = encode_bytes(token_bytes)
    all_ids, all_mask = all_ids.to(device), all_mask.to(device)
    train_ids, heldout_ids = split_ids(V, cfg.holdout, cfg.seed)
    encoder = ByteEncoder(h, all_ids.shape[1], cfg.hidden, cfg.layers, cfg.heads, seed=cfg.seed).to(device)
    encoder.scale.fill_(float(scale))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    order, cursor = torch.randperm(len(train_ids), generator=generator), 0
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    since = 0
    encoder.train()
    bar = tqdm(range(cfg.steps), desc="soft tokenizer", unit="step", disable=not progress, leave=False)
    for step in bar:
        if len(train_ids) <= cfg.batch_size:
            batch = train_ids
        else:
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(train_ids), generator=generator), 0
            batch = train_ids[order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size
        batch = batch.to(device)
        ids, mask = _trim(all_ids[batch], all_mask[batch])
        pred = encoder(ids, mask)
        goal = target[batch]
        terms: dict[str, torch.Tensor] = {}
        if "mse" in weights:
            terms["mse"] = F.mse_loss(pred, goal)
        if "l1" in weights:
            terms["l1"] = F.l1_loss(pred, goal)
        if "retrieval" in weights:
            terms["retrieval"] = F.cross_entropy(pred @ target.T / (h * cfg.temperature), batch)
        loss = sum(weights[k] * v for k, v in terms.items())
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        for k, v in [("loss", loss), *terms.items()]:
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        since += 1
        if step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, **{k: v / since for k, v in sums.items()}, "lr": cfg.lr_at(step)}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums, since = {}, 0
    bar.close()
    encoder.eval()

    def accuracy(ids: torch.Tensor) -> float:
        pred = encoder.embed([token_bytes[i] for i in ids.tolist()])
        return retrieval_accuracy(pred, table.detach().to(device), ids)

    scored = train_ids
    if cfg.accuracy_sample and len(train_ids) > cfg.accuracy_sample:
        pick = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(cfg.seed + 2))
        scored = train_ids[pick[: cfg.accuracy_sample].sort().values]
    return SoftResult(encoder=encoder, train_ids=train_ids, heldout_ids=heldout_ids, history=history,
                      train_accuracy=accuracy(scored), heldout_accuracy=accuracy(heldout_ids), config=cfg,
                      vocab_size=V, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------ files
def _replace_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(result: SoftResult, directory: str | os.PathLike) -> Path:
    """Write ``soft_encoder.safetensors`` (the encoder's state_dict) and ``soft.json`` (format, encoder
    architecture, config, summary, held-out ids) into ``directory``, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.encoder.state_dict().items()}
    _replace_atomic(directory / ENCODER_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "version": 1, "encoder": result.encoder.arch(), "config": asdict(result.config),
            "summary": result.to_dict(), "heldout_ids": result.heldout_ids.tolist()}
    _replace_atomic(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def load(directory: str | os.PathLike) -> ByteEncoder:
    """The :class:`ByteEncoder` saved in ``directory`` by :func:`save` (safetensors only), in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist (not a soft tokenizer directory)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    encoder = ByteEncoder(**meta["encoder"])
    encoder.load_state_dict(load_file(str(directory / ENCODER_FILE)))
    return encoder.eval()


# ------------------------------------------------------------------ checkpoints
def soft_from_checkpoint(checkpoint: str | os.PathLike, cfg: SoftConfig, eval_texts: Sequence[str] | None = None,
                         progress: bool = False,
                         device: str | torch.device = "cpu") -> tuple[SoftResult, dict[str, Any]]:
    """Train a soft tokenizer on a classic checkpoint's input embedding ``embedding.weight``; with
    ``eval_texts``, their bits per byte with the original model, with every embedding row replaced by
    its prediction (``bpb_soft``) and with only the held-out rows replaced (``bpb_soft_heldout_rows``).
    Returns the result and a report (JSON-ready)."""
    from megatron_tfree.checkpoint import CheckpointReader
    from megatron_tfree.checkpoint.names import EMBEDDING

    from .specs import vocab_bytes

    reader = CheckpointReader(checkpoint)
    if reader.kind != "classic":
        raise ValueError(f"{reader.tag_dir} is a {reader.kind!r} checkpoint; the soft tokenizer needs a classic "
                         f"(BPE) model: T-Free has no vocabulary tokens whose embedding rows could be predicted")
    tokens = vocab_bytes(reader.tokenizer.hf_tokenizer)
    table = None
    for _, tensor in reader.tensors({EMBEDDING}):
        table = tensor.float().clone()
    if table is None:
        raise ValueError(f"{reader.tag_dir}: no tensor 'embedding.weight'")
    if len(tokens) != table.shape[0]:
        raise ValueError(f"{reader.tag_dir}: the tokenizer has {len(tokens)} ids, embedding.weight "
                         f"{table.shape[0]} rows")
    result = train_soft(tokens, table, cfg, progress=progress, device=device)
    report: dict[str, Any] = {"checkpoint": str(reader.tag_dir), **result.to_dict(),
                              "heldout_share": len(result.heldout_ids) / len(tokens)}
    if eval_texts:
        from megatron_tfree.inference.bpb import bits_per_byte

        texts = list(eval_texts)
        model = reader.load_model(device=device)
        weight = dict(model.named_parameters())["embedding.weight"]
        original = weight.detach().clone()
        predicted = result.predict(tokens).to(weight.device, weight.dtype)
        bpb_original, details = bits_per_byte(model, reader.tokenizer, texts)
        with torch.no_grad():
            weight.copy_(predicted)
        bpb_soft, _ = bits_per_byte(model, reader.tokenizer, texts)
        held = result.heldout_ids.to(weight.device)
        with torch.no_grad():
            weight.copy_(original)
            weight[held] = predicted[held]
        bpb_held, _ = bits_per_byte(model, reader.tokenizer, texts)
        report.update(bpb_original=bpb_original, bpb_soft=bpb_soft, bpb_change=bpb_soft - bpb_original,
                      bpb_soft_heldout_rows=bpb_held, bpb_heldout_rows_change=bpb_held - bpb_original,
                      eval_texts=len(texts), eval_bytes=details["bytes"])
    return result, report


__all__ = ["BOS", "EOS", "PAD", "ByteEncoder", "SoftConfig", "SoftResult", "encode_bytes", "load",
           "retrieval_accuracy", "save", "soft_from_checkpoint", "split_ids", "train_soft"]

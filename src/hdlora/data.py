"""The synthetic data model of the paper (Section 2, eq. 6) at finite dimension D.

Everything is a torch tensor in float64 on an explicit device; every random draw
comes from a :class:`torch.Generator` derived from ``(seed, stream name)``, so a
seed fixes the teacher, the data, the noise and the initialisations, and changing
one size (say N) does not change the other streams.

Conventions (paper eqs. 1, 6, 31-36):

* teacher ``W*`` (D x P0) and ``w*`` (D,) with i.i.d. N(0, 1) entries,
  ``S* = W* W*^T / sqrt(P0)`` (eq. 31);
* tokens ``X`` (T x D) with i.i.d. N(0, 1) entries;
* noise ``xi`` symmetric T x T, ``xi_ab ~ N(0, Delta / (2 - delta_ab))`` for
  ``a <= b`` (eq. 6): diagonal variance Delta, off-diagonal Delta / 2;
* centering by the population expectation (eq. 34):
  ``E_X A* = delta_ab Tr(S*)/D``, and for the rank-one part
  ``E_X [chi* chi*^T] = delta_ab ||w*||^2 / D``;
* pre-training target pre-activation (eq. 10 / 35)
  ``z* = X S* X^T / D - delta_ab Tr(S*)/D + xi``;
* fine-tuning target pre-activation (eq. 6, right)
  ``z*' = z* + chi* chi*^T - (||w*||^2 / D) I``, ``chi* = X w* / sqrt(D)`` (eq. 12);
* rank r* (beyond the paper, issue 11): ``w*`` (D x r*) with columns ``s_k g_k``, ``g_k`` i.i.d.
  N(0, I_D), and ``z*' = z* + chi* chi*^T - tr(q0) I`` with ``chi* = X w*/sqrt(D)`` (T x r*) and
  ``q0 = w*^T w*/D`` of the drawn teacher (the finite-D convention of rank one); the same formula
  gives the student's field ``chi chi^T - tr(q) I`` of a LoRA ``w`` (D x r).  Rank one keeps
  vectors (D,), so its numbers are those of the paper's code path bit for bit;
* the outputs ``y = sigma(z*) X`` are never materialised: the sequence loss
  only needs ``sigma(z*)`` and the token Gram matrix ``G = X X^T / D`` (eq. 29).

Fine-tuning data for ``e = 1`` (``reuse``) are the first N' pre-training
sequences *and their noise* (the tensors are views of the pre-training ones).

The "effective pre-training" mode skips the pre-training stage: the frozen fields
``(z*, z)`` of each sequence are drawn from the Gaussian law Q of Result 1
(eq. 13) for given ``(Q0, Q, M)`` and Delta, while the rank-one fields
``chi*, chi`` still come from real D-dimensional tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from .params import ParamError

DTYPE = torch.float64

# Stream names -> fixed integers: a seed and a name give one generator.
_STREAMS = {
    "teacher": 1,
    "pretrain_data": 2,
    "finetune_data": 3,
    "pretrain_test": 4,
    "finetune_test": 5,
    "pretrain_init": 6,
    "finetune_init": 7,
    "effective_train": 8,
    "effective_pretrain_test": 9,
    "effective_finetune_test": 10,
    "pool": 11,
    "pool_tokens": 12,
    "teacher_columns": 13,
}


def generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` determined by ``(seed, stream)`` only."""
    if stream not in _STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {sorted(_STREAMS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParamError(f"seed must be an integer >= 0, got {seed!r}")
    state = np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(state) & ((1 << 63) - 1))
    return g


# --------------------------------------------------------------------------- teacher
#: How the fine-tuning teacher w* is drawn: i.i.d. Gaussian columns (eq. 6), or sqrt(D) times an
#: orthonormal frame (q0 = diag(s_k^2) exactly at any D, for low-noise validation; issue 11).
TEACHERS = ("gaussian", "orthonormal")


@dataclass(frozen=True)
class Teacher:
    """Target weights (eq. 6): ``W*`` (D x P0), i.i.d. N(0, 1), and the fine-tuning teacher ``w*``:
    a vector (D,) at rank r* = 1 (the paper), a matrix (D, r*) at rank r* >= 2."""

    W_star: torch.Tensor
    w_star: torch.Tensor

    @property
    def D(self) -> int:
        return self.W_star.shape[0]

    @property
    def P0(self) -> int:
        return self.W_star.shape[1]

    @property
    def rank(self) -> int:
        """r*, the number of columns of w*."""
        return 1 if self.w_star.dim() == 1 else self.w_star.shape[1]

    @property
    def trace_S_star(self) -> float:
        """Tr S* = ||W*||_F^2 / sqrt(P0) (eq. 31, 34)."""
        return float((self.W_star**2).sum()) / math.sqrt(self.P0)

    @property
    def q0(self) -> float:
        """q0 = ||w*||^2 / D (eq. 9), tr(w*^T w*)/D at rank r*; -> sum_k s_k^2 as D -> inf."""
        if self.w_star.dim() == 1:
            return float(self.w_star @ self.w_star) / self.D
        return float((self.w_star * self.w_star).sum()) / self.D


def check_teacher(teacher: str) -> str:
    if teacher not in TEACHERS:
        raise ParamError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    return teacher


def draw_teacher(
    D: int,
    P0: int,
    seed: int,
    device="cpu",
    *,
    rank: int = 1,
    strengths: tuple[float, ...] | None = None,
    kind: str = "gaussian",
) -> Teacher:
    """W* (D x P0) with i.i.d. N(0, 1) entries and w* (eq. 6; rank r* beyond the paper).

    w* is drawn first, so it does not depend on P0 (``P0 = 0`` is used by the
    effective mode, which needs only w*).  At rank r* >= 2 the columns g_2, ..., g_r* are drawn
    from their own stream ``teacher_columns`` (rows of one (r* - 1) x D draw), so neither W* nor
    g_1 depends on r*: g_1 is the rank-one w*, and the pre-training does not depend on r*.
    ``strengths`` (s_k, default all 1) scale the columns: w*_k = s_k g_k.  ``kind='orthonormal'``
    replaces (g_1, ..., g_r*) by sqrt(D) times the Q of their QR decomposition (signs such that
    Q_k . g_k > 0), so that q0 = w*^T w*/D = diag(s_k^2) up to rounding.  At r* = 1, s = 1,
    Gaussian the draws and the returned tensors are exactly those of the paper's model.
    """
    check_teacher(kind)
    if rank > D:
        raise ParamError(f"teacher_rank (r*) must be <= dim (D) = {D}, got {rank}; lower it or raise dim")
    g = generator(seed, "teacher", device)
    w_star = torch.randn(D, generator=g, device=device, dtype=DTYPE)
    W_star = torch.randn(D, P0, generator=g, device=device, dtype=DTYPE)
    if rank > 1:
        g_cols = generator(seed, "teacher_columns", device)
        rest = torch.randn(rank - 1, D, generator=g_cols, device=device, dtype=DTYPE)
        w_star = torch.cat([w_star.unsqueeze(0), rest]).T.contiguous()  # (D, r*)
    if kind == "orthonormal":
        frame = w_star.reshape(D, -1)
        Q, R = torch.linalg.qr(frame)
        Q = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
        w_star = (math.sqrt(D) * Q).reshape(w_star.shape).contiguous()  # QR's Q is column-major
    if strengths is not None and any(s != 1.0 for s in strengths):
        if len(strengths) != rank:
            raise ParamError(f"teacher_strengths must have {rank} entries (teacher_rank), got {strengths!r}")
        s = torch.tensor(strengths, dtype=DTYPE, device=device)
        w_star = w_star * (s[0] if rank == 1 else s)
    return Teacher(W_star, w_star)


# --------------------------------------------------------------------------- fields
def eye(T: int, device) -> torch.Tensor:
    return torch.eye(T, dtype=DTYPE, device=device)


def quadratic_field(X: torch.Tensor, W: torch.Tensor, trace_S: float | torch.Tensor) -> torch.Tensor:
    """Centred quadratic pre-activation for ``S = W W^T / sqrt(P)`` (eqs. 33-35).

    ``z = X S X^T / D - delta_ab Tr(S)/D``, computed as ``(XW)(XW)^T / (D sqrt(P))``
    without forming S.  ``X``: (n, T, D), ``W``: (D, P); returns (n, T, T).
    """
    D, P = W.shape
    XW = X @ W
    A = XW @ XW.transpose(-1, -2) / (D * math.sqrt(P))
    return A - eye(X.shape[-2], X.device) * (trace_S / D)


def rank_one_field(X: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chi = X w / sqrt(D)`` (eq. 12) and the centred ``chi chi^T - (||w||^2/D) I`` (eqs. 6, 15)."""
    D = w.shape[0]
    chi = X @ w / math.sqrt(D)
    field = chi.unsqueeze(-1) * chi.unsqueeze(-2) - eye(X.shape[-2], X.device) * (w @ w / D)
    return chi, field


def lora_field(X: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA field of a vector w (D,) (:func:`rank_one_field`, the paper's rank one) or of a
    matrix w (D, r): ``chi = X w / sqrt(D)`` (T x r) and ``chi chi^T - tr(q) I`` with
    ``q = w^T w / D`` of this w (issue 11; differentiable in w, centering included)."""
    if w.dim() == 1:
        return rank_one_field(X, w)
    D = w.shape[0]
    chi = X @ w / math.sqrt(D)
    field = chi @ chi.transpose(-1, -2) - eye(X.shape[-2], X.device) * ((w * w).sum() / D)
    return chi, field


def gram(X: torch.Tensor) -> torch.Tensor:
    """``G = X X^T / D`` (eq. 29), shape (n, T, T)."""
    return X @ X.transpose(-1, -2) / X.shape[-1]


def draw_noise(n: int, T: int, Delta: float, g: torch.Generator, device) -> torch.Tensor:
    """Symmetric noise xi (eq. 6): diagonal variance Delta, off-diagonal Delta/2.

    Built as ``sqrt(Delta/2) (E + E^T)/sqrt(2)`` with E i.i.d. N(0, 1):
    off-diagonal variance Delta/2, diagonal ``(Delta/2) * 4 / 2 = Delta``.
    """
    E = torch.randn(n, T, T, generator=g, device=device, dtype=DTYPE)
    return math.sqrt(Delta / 2.0) * (E + E.transpose(-1, -2)) / math.sqrt(2.0)


def draw_tokens(n: int, T: int, D: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.randn(n, T, D, generator=g, device=device, dtype=DTYPE)


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Dataset:
    """A training set in the form the losses need (y is never materialised).

    Attributes:
        X: tokens, (n, T, D).
        xi: the label noise of each sequence, (n, T, T).
        z_star: target pre-activation (eq. 10 for pre-training; plus the centred
            rank-one term for fine-tuning), (n, T, T).
        G: token Gram matrices X X^T / D (eq. 29), (n, T, T).
        z_frozen: optional frozen student field z of the pre-trained model (eq. 11),
            filled in for fine-tuning sets (or drawn directly in the effective mode).
    """

    X: torch.Tensor
    xi: torch.Tensor
    z_star: torch.Tensor
    G: torch.Tensor
    z_frozen: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def subset(self, index: torch.Tensor | slice) -> Dataset:
        """Rows ``index`` (e.g. the N' sequences chosen by an active-selection score)."""
        zf = None if self.z_frozen is None else self.z_frozen[index]
        return Dataset(self.X[index], self.xi[index], self.z_star[index], self.G[index], zf)

    def with_frozen(self, z_frozen: torch.Tensor) -> Dataset:
        return replace(self, z_frozen=z_frozen)


def pretrain_target(X: torch.Tensor, xi: torch.Tensor, teacher: Teacher, chunk: int = 65536) -> torch.Tensor:
    """``z* = X S* X^T / D - delta_ab Tr(S*)/D + xi`` (eqs. 10, 34-35), in chunks."""
    out = torch.empty_like(xi)
    tr = teacher.trace_S_star
    for sl in _chunks(X.shape[0], chunk):
        out[sl] = quadratic_field(X[sl], teacher.W_star, tr) + xi[sl]
    return out


def finetune_target(X: torch.Tensor, z_star_pre: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """``z*' = z* + chi* chi*^T - (||w*||^2/D) I`` (eq. 6, population centering eq. 34);
    ``- tr(q0) I`` at rank r*."""
    return z_star_pre + lora_field(X, teacher.w_star)[1]


def pretrain_dataset(
    n: int,
    T: int,
    Delta: float,
    teacher: Teacher,
    seed: int,
    device="cpu",
    stream: str = "pretrain_data",
    chunk: int = 65536,
) -> Dataset:
    """N pre-training sequences from P (eq. 6, left)."""
    g = generator(seed, stream, device)
    X = torch.empty(n, T, teacher.D, dtype=DTYPE, device=device)
    for sl in _chunks(n, chunk):  # chunked draws: same numbers as one draw, bounded temporaries
        X[sl] = draw_tokens(sl.stop - sl.start, T, teacher.D, g, device)
    xi = draw_noise(n, T, Delta, g, device)
    z_star = pretrain_target(X, xi, teacher, chunk)
    G = torch.empty_like(xi)
    for sl in _chunks(n, chunk):
        G[sl] = gram(X[sl])
    return Dataset(X, xi, z_star, G)


def finetune_dataset(
    n_ft: int,
    T: int,
    Delta: float,
    teacher: Teacher,
    seed: int,
    device="cpu",
    reuse_from: Dataset | None = None,
    stream: str = "finetune_data",
) -> Dataset:
    """N' fine-tuning sequences from P' (eq. 6, right).

    ``reuse_from`` given (e = 1): the first N' sequences of that pre-training set and
    their noise are reused (views, no copy); otherwise (e = 0) fresh sequences.
    """
    if reuse_from is not None:
        if n_ft > reuse_from.n:
            raise ParamError(f"reuse (e = 1) needs N' <= N, got N' = {n_ft} > N = {reuse_from.n}")
        base = reuse_from.subset(slice(0, n_ft))
    else:
        base = pretrain_dataset(n_ft, T, Delta, teacher, seed, device, stream=stream)
    return Dataset(base.X, base.xi, finetune_target(base.X, base.z_star, teacher), base.G)


# --------------------------------------------------------------------------- effective mode
@dataclass(frozen=True)
class Effective:
    """Order parameters of an effective pre-training (Result 1, eq. 13)."""

    Q0: float
    Q: float
    M: float

    @staticmethod
    def from_mapping(eff, Delta: float) -> Effective:
        try:
            keys = set(eff)
        except TypeError:
            raise ParamError(f"effective must be a dict with keys Q0, Q, M, got {eff!r}") from None
        if keys != {"Q0", "Q", "M"}:
            raise ParamError(f"effective must have exactly the keys Q0, Q, M, got {sorted(keys)}")
        vals = {}
        for k in ("Q0", "Q", "M"):
            try:
                vals[k] = float(eff[k])
            except (TypeError, ValueError):
                raise ParamError(f"effective {k} must be a number, got {eff[k]!r}") from None
            if not math.isfinite(vals[k]):
                raise ParamError(f"effective {k} must be finite, got {vals[k]}")
        if vals["Q0"] <= 0:
            raise ParamError(f"effective Q0 must be > 0, got {vals['Q0']}")
        if vals["Q"] < 0:
            raise ParamError(f"effective Q must be >= 0, got {vals['Q']}")
        A0 = vals["Q0"] + Delta / 2.0
        if vals["Q"] - vals["M"] ** 2 / A0 < -1e-12 * max(1.0, vals["Q"]):
            raise ParamError(
                f"effective (Q0, Q, M) must give a positive covariance: need M^2 <= Q (Q0 + Delta/2), "
                f"got M = {vals['M']}, Q = {vals['Q']}, Q0 + Delta/2 = {A0}"
            )
        return Effective(**vals)


def effective_fields(
    n: int, T: int, eff: Effective, Delta: float, g: torch.Generator, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (z*, z) ~ Q (eq. 13): symmetric T x T, entry (a, b) with covariance
    ``(1 + delta_ab) [[Q0 + Delta/2, M], [M, Q]]``; z* includes the noise xi.

    Construction: ``z* = sqrt(A0) Z1``, ``z = (M/sqrt(A0)) Z1 + sqrt(Q - M^2/A0) Z2`` with
    ``A0 = Q0 + Delta/2`` and Z1, Z2 independent symmetric matrices whose entries have
    variance ``1 + delta_ab`` (``(E + E^T)/sqrt(2)``).
    """
    A0 = eff.Q0 + Delta / 2.0
    B = max(eff.Q - eff.M**2 / A0, 0.0)

    def sym():
        E = torch.randn(n, T, T, generator=g, device=device, dtype=DTYPE)
        return (E + E.transpose(-1, -2)) / math.sqrt(2.0)

    Z1, Z2 = sym(), sym()
    return math.sqrt(A0) * Z1, eff.M / math.sqrt(A0) * Z1 + math.sqrt(B) * Z2


def effective_finetune_dataset(
    n_ft: int,
    T: int,
    Delta: float,
    eff: Effective,
    teacher: Teacher,
    seed: int,
    device="cpu",
    stream: str = "effective_train",
    storage: str = "float64",
) -> Dataset:
    """Fine-tuning set of the effective mode: (z*, z) ~ Q, real tokens for chi*, chi.

    ``xi`` is not separately defined here (it is inside z*): it is stored as zeros.
    ``storage`` is how the N' x T x D tokens are kept (:data:`TOKEN_STORAGE`): ``float64`` (a
    tensor, as always), ``float32`` or ``regenerate`` (a :class:`Tokens`); the draws are the same
    in all three, and G and z*' are computed from the float64 draws.
    """
    g = generator(seed, stream, device)
    z_star, z = effective_fields(n_ft, T, eff, Delta, g, device)
    X, G, chi_field = tokens_with_fields(n_ft, T, teacher.D, g, device, storage, teacher.w_star)
    return Dataset(X, torch.zeros_like(z), z_star + chi_field, G, z_frozen=z)


# --------------------------------------------------------------------------- token storage
#: How the tokens of a large (effective-mode) fine-tuning set are kept: ``float64`` (one tensor),
#: ``float32`` (one tensor of half the size, each chunk cast back to float64 when used) or
#: ``regenerate`` (no tokens kept: each chunk is drawn again from the generator state saved at
#: its start, bit-identical to the first draw; memory O(chunk)).
TOKEN_STORAGE = ("float64", "float32", "regenerate")

#: Numbers per token chunk (2^24 float64 = 128 MiB): the sequences per chunk of the token passes.
TOKEN_CHUNK_NUMBERS = 1 << 24


def token_chunk(T: int, D: int, cap: int = 1 << 16) -> int:
    """Sequences per token chunk: ``min(cap, 2^24 // (T D))`` rounded down to a multiple of 16, at least 16.

    A multiple of 16 sequences holds a multiple of 16 numbers, and torch's CPU ``randn`` fills
    blocks of 16: drawing n sequences chunk by chunk then gives the same numbers as one draw
    (checked by a test), so chunked storage changes no draw.
    """
    c = min(cap, TOKEN_CHUNK_NUMBERS // max(1, T * D))
    return max(16, c - c % 16)


class Tokens:
    """Tokens X (n, T, D) drawn chunk by chunk from one generator, kept as ``float32`` or regenerated.

    On CPU the chunked draws equal one draw of all n sequences (see :func:`token_chunk`).

    Quacks like the float64 tensor it replaces where the simulator uses it: ``shape``, ``dtype``
    (float64), ``device`` and slicing ``X[a:b]`` (a float64 tensor of those rows).  For
    ``regenerate`` the generator state at the start of each chunk of ``chunk`` sequences is
    saved (a few kB each) and the chunk is redrawn on demand: the same numbers as the first
    draw, so the results equal those of float64 storage bit for bit; slices aligned with the
    chunks (the simulator's passes use the same ``chunk``) redraw each chunk once.
    """

    def __init__(
        self,
        n: int,
        T: int,
        D: int,
        device,
        storage: str,
        chunk: int,
        data: torch.Tensor | None = None,
        states: list | None = None,
    ) -> None:
        self.shape = torch.Size((n, T, D))
        self.dtype = DTYPE
        self.device = torch.device(device)
        self.storage = storage
        self.chunk = int(chunk)
        self._data = data
        self._states = states

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held (the float32 tensor, or the saved generator states)."""
        if self._data is not None:
            return self._data.numel() * self._data.element_size()
        return sum(s.numel() * s.element_size() for s in self._states or ())

    def _block(self, k: int) -> torch.Tensor:
        n, T, D = self.shape
        g = torch.Generator(device=self.device)
        assert self._states is not None  # _block is only used for regenerated tokens
        g.set_state(self._states[k])
        rows = min(n, (k + 1) * self.chunk) - k * self.chunk
        return draw_tokens(rows, T, D, g, self.device)

    def __getitem__(self, index) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"Tokens ({self.storage}) support contiguous slices only, got {index!r}")
        start, stop, _ = index.indices(self.shape[0])
        if self._data is not None:
            return self._data[start:stop].to(DTYPE)
        if stop <= start:
            return torch.empty(0, *self.shape[1:], dtype=DTYPE, device=self.device)
        k0, k1 = start // self.chunk, (stop - 1) // self.chunk
        parts = [self._block(k) for k in range(k0, k1 + 1)]
        X = parts[0] if len(parts) == 1 else torch.cat(parts)
        off = k0 * self.chunk
        return X[start - off : stop - off]


def tokens_with_fields(n: int, T: int, D: int, g: torch.Generator, device, storage: str, w_star: torch.Tensor):
    """Draw tokens X (n, T, D) from ``g`` and return ``(X, G, chi* chi*^T - (||w*||^2/D) I)``
    (``- tr(q0) I`` for a teacher of rank r*, :func:`lora_field`).

    ``storage='float64'``: one draw, exactly as :func:`draw_tokens` (X a tensor).  Otherwise the
    draw is made chunk by chunk of :func:`token_chunk` sequences (on CPU the same numbers as one
    draw), G and the rank-one target field are computed from each
    float64 chunk, and X is a :class:`Tokens` holding float32 copies or only the generator
    states.  Peak memory beyond the kept tokens: one chunk.
    """
    if storage not in TOKEN_STORAGE:
        raise ParamError(f"token storage must be one of {TOKEN_STORAGE}, got {storage!r}")
    if storage == "float64":
        X = draw_tokens(n, T, D, g, device)
        return X, gram(X), lora_field(X, w_star)[1]
    chunk = token_chunk(T, D)
    G = torch.empty(n, T, T, dtype=DTYPE, device=device)
    field = torch.empty(n, T, T, dtype=DTYPE, device=device)
    data = torch.empty(n, T, D, dtype=torch.float32, device=device) if storage == "float32" else None
    states: list[torch.Tensor] | None = [] if storage == "regenerate" else None
    for sl in _chunks(n, chunk):
        if states is not None:
            states.append(g.get_state())
        Xc = draw_tokens(sl.stop - sl.start, T, D, g, device)
        G[sl] = gram(Xc)
        field[sl] = lora_field(Xc, w_star)[1]
        if data is not None:
            data[sl] = Xc.to(torch.float32)
    return Tokens(n, T, D, device, storage, chunk, data, states), G, field

"""The order parameters of the two state evolutions, declared once (Results 4 and 5).

:class:`hdlora.theory.pretrain.PretrainResult`, :class:`hdlora.theory.finetune.FinetuneResult`
and :class:`hdlora.theory.solve.TheoryResult` extend these records, so each symbol is
declared in one place and keeps its position (first) in the results and their dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PretrainOrderParameters", "FinetuneOrderParameters", "FinetuneDiagnostics"]


@dataclass(frozen=True)
class PretrainOrderParameters:
    """Q, M, V (eqs. 8, 52-54) and their conjugates M_hat, Q_hat, V_hat (eqs. 49-51)."""

    Q: float
    M: float
    V: float
    Mhat: float
    Qhat: float
    Vhat: float


@dataclass(frozen=True)
class FinetuneOrderParameters:
    """q, m, v (eqs. 9, 67-69) and their conjugates q_hat, m_hat, v_hat (eqs. 70-72)."""

    q: float
    m: float
    v: float
    qhat: float
    mhat: float
    vhat: float


@dataclass(frozen=True, kw_only=True)
class FinetuneDiagnostics:
    """What every fine-tuning fixed point (rank one and rank r) reports besides its order parameters: the replicon
    (LHS of eq. 78, stable if < 1), the effective noise of its fields, the engine's converged / residual /
    iterations, the Monte-Carlo samples n_mc, the prox diagnostics (prox_failed: Newton not converged at the last
    evaluation; prox_not_max: not a strict local maximum), the Monte-Carlo standard errors, the wall time and the
    iteration history (left out of :meth:`to_dict`).  Keyword-only: the records extending it keep their own fields'
    positions."""

    replicon_finetune: float
    delta_eff: float
    converged: bool
    residual: float
    iterations: int
    n_mc: int
    prox_failed: int
    prox_not_max: int
    mc_se: dict = field(default_factory=dict)
    wall_time: float = 0.0
    history: tuple = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d

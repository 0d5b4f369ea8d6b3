"""The order parameters of the two state evolutions, declared once (Results 4 and 5).

:class:`hdlora.theory.pretrain.PretrainResult`, :class:`hdlora.theory.finetune.FinetuneResult`
and :class:`hdlora.theory.solve.TheoryResult` extend these records, so each symbol is
declared in one place and keeps its position (first) in the results and their dicts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PretrainOrderParameters", "FinetuneOrderParameters"]


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

"""``hdlora simulate``: the finite-D simulation (pre-training + LoRA) from the command line.

Rank r (beyond the paper, issue 11): ``--lora-rank R --teacher-rank RS [--teacher-strengths 1,0.5]
[--teacher gaussian|orthonormal]``; the defaults are the paper's rank-one model.
"""

from __future__ import annotations

import argparse
import time
import warnings

from ..cli import (
    _float,
    add_common_arguments,
    add_param_arguments,
    add_rank_arguments,
    dumps,
    format_table,
    integer,
    params_from_args,
    print_warnings,
)
from ..params import ParamError

#: the losses (the same as :data:`hdlora.simulate.losses.LOSSES`; not imported from there, which
#: imports torch, so that building the parser stays light)
LOSSES = ("sequence", "attention")

_TABLE_KEYS = (
    "pretrain_train_error",
    "pretrain_test_error",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "Q0",
    "Q",
    "M",
    "q0",
    "q",
    "m",
    "pretrain_iterations",
    "pretrain_converged",
    "finetune_iterations",
    "finetune_converged",
    "finetune_informed_won",
    "beta",
    "delta_eff",
    "delta_eff_actft",
    "delta_eff_measured",
)
_ACTIVE_TABLE_KEYS = (
    "uniform_finetune_test_error",
    "uniform_overlap",
    "delta_finetune_test_error",
    "delta_overlap",
    "uniform_delta_eff_measured",
    "selection_score_selected",
    "selection_score_pool",
)
_BETA_WORDS = {"optimal": "measured", "optimal-measured": "measured", "optimal-theory": "theory"}
#: how the fine-tuning teacher is drawn (the same as :data:`hdlora.data.TEACHERS`, not imported: torch)
TEACHERS = ("gaussian", "orthonormal")
#: lists of the rank-r LoRA shown in the table when r or r* > 1 (seed means, entry by entry)
_RANK_TABLE_KEYS = ("q_eigenvalues", "m_singular_values", "principal_cosines")


def _beta(text: str):
    return text if text in _BETA_WORDS else _float(text)


def add_teacher_argument(p: argparse.ArgumentParser) -> None:
    """How the simulator draws w* (with the rank flags of :func:`hdlora.cli.add_rank_arguments`)."""
    p.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="gaussian",
        help="w*: i.i.d. Gaussian columns (eq. 6) or sqrt(D) x an orthonormal frame (q0 = diag(s_k^2) exactly)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_param_arguments(p)
    add_rank_arguments(p)
    add_teacher_argument(p)
    g = p.add_argument_group("simulation")
    g.add_argument(
        "--beta",
        type=_beta,
        default=1.0,
        help="recalibration W_hat -> sqrt(beta) W_hat (eq. 26): a number, 'optimal' (beta* = M/Q measured "
        "on each seed's pre-trained weights) or 'optimal-theory' (beta* = M/Q of the pre-training "
        "state evolution, the paper's App. E)",
    )
    g.add_argument(
        "--active-pool",
        type=_float,
        default=None,
        help="active fine-tuning (Algorithm 1): label the alpha' D best of a pool of alpha_bar' D "
        "candidates; also reports the uniform choice from the same pool (uniform_*, delta_*)",
    )
    g.add_argument("--dim", type=integer, default=150, help="D, token dimension (>= 2)")
    g.add_argument("--seeds", type=integer, default=4, help="number of seeds (0..S-1) to average")
    g.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda when available)")
    g.add_argument("--loss", default="sequence", help=f"{' | '.join(LOSSES)} (eq. 2-3 or eq. 30)")
    g.add_argument("--restarts", type=integer, default=2, help="random fine-tuning starts besides w = w*")
    g.add_argument(
        "--reduce-width",
        action="store_true",
        help="kappa > 1: pre-train a width-D student with lam sqrt(kappa) (same S minimisers)",
    )
    g.add_argument("--effective-Q0", type=_float, default=None, help="effective pre-training: Q0 (eq. 13)")
    g.add_argument("--effective-Q", type=_float, default=None, help="effective pre-training: Q")
    g.add_argument("--effective-M", type=_float, default=None, help="effective pre-training: M")
    g.add_argument(
        "--threads",
        type=integer,
        default=0,
        help="torch CPU threads (0: torch default; 1 is fastest on a shared, busy machine)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (keys + <key>_se); progress and warnings still go to stderr",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory / time estimate (and whether it fits) and stop; nothing is allocated",
    )
    add_common_arguments(p)


def _mean_se(mean, se, n_seeds: int) -> str:
    """'mean ± s.e.'; with one seed there is no standard error, so no ±."""
    if n_seeds < 2 or se is None or se != se:
        return f"{mean:.6g}"
    return f"{mean:.6g} ± {se:.2g}"


def _count(per_seed, key: str, word: str) -> str | None:
    """A boolean over seeds as a count ('4/4 converged'), never averaged."""
    vals = [s.get(key) for s in per_seed if isinstance(s, dict)]
    vals = [v for v in vals if v is not None and v == v]  # NaN: not defined for this seed (effective mode)
    if not vals:
        return None
    return f"{sum(bool(v) for v in vals)}/{len(vals)} {word}"


#: boolean keys of a seed: shown as counts (the word says what is counted)
_BOOL_WORDS = {"pretrain_converged": "converged", "finetune_converged": "converged", "finetune_informed_won": "seeds"}


def run(args: argparse.Namespace) -> int:  # noqa: F811 (the CLI entry point of this command)
    from .run import ACTIVE_KEYS, KEYS
    from .run import run as simulate_run  # the library function, not this one

    optimal = _BETA_WORDS.get(args.beta) if isinstance(args.beta, str) else None
    params = params_from_args(
        args,
        beta=1.0 if optimal else args.beta,
        active_pool=args.active_pool,
        lora_rank=args.lora_rank,
        teacher_rank=args.teacher_rank,
        teacher_strengths=args.teacher_strengths,
    )
    eff_vals = {"Q0": args.effective_Q0, "Q": args.effective_Q, "M": args.effective_M}
    given = [k for k, v in eff_vals.items() if v is not None]
    if given and len(given) != 3:
        raise ParamError(f"effective mode needs all of --effective-Q0, --effective-Q, --effective-M; got only {given}")
    effective = eff_vals if given else None
    if args.threads < 0:
        raise ParamError(f"threads must be >= 0 (0: torch default), got {args.threads}")
    from ..resources_cli import simulate_gate

    if (rc := simulate_gate(args, params, effective)) is not None:
        return rc
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = simulate_run(
            params,
            args.dim,
            args.seeds,
            device=args.device,
            loss=args.loss,
            effective=effective,
            restarts=args.restarts,
            progress=not args.quiet,
            reduce_width=args.reduce_width,
            optimal_beta=optimal,
            teacher=args.teacher,
        )
    messages = [str(w.message) for w in caught]
    d = res.to_dict()
    d["wall_time_total"] = time.perf_counter() - t0
    d["warnings"] = messages
    print_warnings("simulate", messages, args.quiet)
    if args.json:
        print(dumps(d))
    else:
        keys = _TABLE_KEYS + (_ACTIVE_TABLE_KEYS if params.active_pool is not None else ())
        rows = {}
        for k in keys:
            if k not in KEYS + ACTIVE_KEYS:
                continue
            if k in _BOOL_WORDS:
                rows[k] = _count(d.get("per_seed", ()), k, _BOOL_WORDS[k]) or "n/a"
            else:
                rows[k] = _mean_se(d[k], d.get(k + "_se"), d["n_seeds"])
        if not params.rank_one or args.teacher != "gaussian":
            rows["lora_rank, teacher_rank"] = f"{params.lora_rank}, {params.teacher_rank} ({args.teacher} teacher)"
            for k in _RANK_TABLE_KEYS:
                if isinstance(d.get(k), list):
                    rows[k] = "[" + ", ".join(f"{x:.4g}" for x in d[k]) + "]"
        rows["seeds"] = d["n_seeds"]
        rows["wall time [s]"] = f"{d['wall_time_total']:.1f}"
        print(
            format_table(
                rows,
                title=f"hdlora simulate: D = {res.dim}, {res.loss} loss, {res.device}, "
                f"{'effective' if effective else 'full'} pre-training ("
                + ("mean ± s.e.)" if res.n_seeds > 1 else "one seed: no standard error)"),
            )
        )
    return 0

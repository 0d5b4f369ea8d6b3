"""Test-only task kind for the SLURM test, named in its sweep file as "_slurm_kinds:job_env".

It reports where it ran: the SLURM job (SLURM_JOB_ID, set by slurmd for the job's processes),
the host, and the worker's thread settings (one BLAS / torch thread, as in the local pool).
"""

from __future__ import annotations

import os
import socket


def job_env(params, options, init):
    import torch

    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job_name": os.environ.get("SLURM_JOB_NAME"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        **{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "converged": True,
    }

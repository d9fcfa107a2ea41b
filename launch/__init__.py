"""Turning a config into jobs: SLURM via submitit, local processes, requeue, eval submission, status.

- ``launch/slurm.py``: the command line (``python launch/slurm.py --help``).
- ``launch/plan.py``: flags -> recipe, resolved config, world size, SLURM parameters, estimate.
- ``launch/cluster_profile.py``: site profiles ``configs/cluster/<site>.yaml``.
- ``launch/jobs.py``: the submitit callable of a training run (``PretrainJob``; eval jobs: ``evals.submit``), the stop-signal sequence
  (USR2: save and requeue; SIGTERM: save and stop) and the rendezvous port.
- ``launch/local.py``: ``--local``, the same job as N processes on this machine.
- ``launch/cluster.py``: one short controller probe (``scontrol ping``), then bounded sinfo/squeue/sacct queries.
- ``launch/status.py``: job state, restarts, why a job failed, newest checkpoint, last loss and
  throughput, eval results of runs.
- ``launch/local_cluster.sh``: a real single-machine SLURM cluster for tests and development.
"""

"""Turning a config into jobs: SLURM via submitit, local processes, requeue, eval submission, status.

- ``launch/slurm.py``: the command line (``python launch/slurm.py --help``).
- ``launch/plan.py``: flags -> recipe, resolved config, world size, SLURM parameters, estimate.
- ``launch/cluster_profile.py``: site profiles ``configs/cluster/<site>.yaml``.
- ``launch/jobs.py``: the submitit callables (``PretrainJob``, ``EvalJob``) and the preemption sequence.
- ``launch/local.py``: ``--local``, the same job as N processes on this machine.
- ``launch/cluster.py``: bounded sinfo/squeue/sacct queries.
- ``launch/status.py``: job state, restarts, newest checkpoint, last loss and throughput of runs.
- ``launch/local_cluster.sh``: a real single-machine SLURM cluster for tests and development.
"""

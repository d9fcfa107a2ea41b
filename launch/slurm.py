"""Submit a pretraining run to SLURM (submitit), run it locally, or show what would be submitted.

    python launch/slurm.py --method mae --nodes 8
    python launch/slurm.py --help

Thin command line: the plan (recipe, resolved config, SLURM parameters) is built in launch/plan.py,
the job that runs in every task is launch/jobs.py, the local path launch/local.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python launch/slurm.py`: import from the repository, not from launch/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.cluster_profile import LaunchError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

EPILOG = """\
examples:
  # the method's paper recipe (configs/default_recipes.yaml: mae -> configs/mae/vit_l16_in1k.yaml) on
  # 8 nodes x 8 GPUs; mysite = your profile configs/cluster/mysite.yaml (copy example_h100.yaml)
  python launch/slurm.py --cluster mysite --method mae --nodes 8
  # what would be submitted, with a GPU-hours estimate; submits nothing, needs no cluster
  python launch/slurm.py --method mae --nodes 8 --dry-run
  # any recipe, config overrides at the end, k-NN and linear eval jobs after pretraining succeeds;
  # the same command once the run has finished submits only the eval jobs (no training job)
  python launch/slurm.py --config configs/mae/vit_l16_in1k.yaml --nodes 4 --time 2-00:00:00 \\
      --name mae_l16_run2 --eval knn,linear train.steps=100000 optim.base_lr=2e-4
  # the single-machine test cluster (first: sudo launch/local_cluster.sh start), CPU ranks
  python launch/slurm.py --cluster local --config configs/mae/tiny_fmnist.yaml --nodes 2
  # the same job as 2 processes on this machine, without SLURM
  python launch/slurm.py --config configs/mae/tiny_fmnist.yaml --local --nproc 2

run directory:
  <run.root>/<run.name>/, runs/<name>/ by default (--name sets run.name; a relative run.root is
  relative to the directory you submit from). Every rank and every requeued attempt writes there;
  submitit's logs are in runs/<name>/slurm/<jobid>_<rank>_log.{out,err}. Submitting the same name
  again resumes from its newest complete checkpoint. python launch/status.py <name> shows the job,
  its restarts, why it failed, the newest checkpoint, the last loss and the eval results.

stopping, preemption and time limits (the launcher prints these commands):
  scancel JOB                  save and stop: SLURM sends SIGTERM to every process, and SIGKILL KillWait
                               seconds later (scontrol show config | grep KillWait). The ranks agree at
                               the next step, save it, and exit 3; the job ends CANCELLED, never
                               requeued. Submit the same command again to continue.
  scancel --signal=USR2 JOB    save and requeue: as at a time limit (USR2 --signal-delay seconds
                               before it), the ranks save the next step, then the job requeues itself
                               (same job id) and resumes there. At most --max-timeouts time-limit
                               requeues and --max-requeues restarts in all; then the job fails, its
                               newest checkpoint complete.
  scontrol requeue JOB         restart now: SIGTERM as for scancel (the ranks save if the save fits in
                               KillWait), then SLURM starts the job again (same id), which resumes from
                               the newest complete checkpoint.
  A save cut short by SIGKILL has no COMPLETE marker and is never used. A rank that dies ends the job
  at once (srun --kill-on-bad-exit); `scontrol requeue JOB` or the same command again resumes it.

exit codes: 0 submitted (or --dry-run / --local finished), 2 bad input (nothing submitted; the message
  names the flag, file or key and what is valid), 3 --local run stopped with a checkpoint, 1 other
  failures (e.g. no SLURM controller answered: nothing submitted).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/slurm.py",
        description=(
            "Launch self-supervised pretraining as one SLURM job (submitit): one task per GPU, every rank\n"
            "running pretrain.train with the process group from submitit's environment (NCCL on GPUs, gloo\n"
            "on CPU nodes). Preemption-safe: on SLURM's USR2 the ranks save and the job requeues itself; on\n"
            "SIGTERM (scancel) they save and stop."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument(
        "--method",
        metavar="NAME",
        help="method name; submits its default recipe (configs/default_recipes.yaml)",
    )
    what.add_argument(
        "--config",
        metavar="YAML",
        help="recipe YAML, e.g. configs/mae/vit_l16_in1k.yaml (instead of --method)",
    )
    what.add_argument(
        "--name",
        metavar="RUN",
        help="run name (sets run.name; the run directory is <run.root>/<name>, runs/<name>)",
    )
    what.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=1000"
    )

    res = p.add_argument_group("resources (override the --cluster profile)")
    res.add_argument(
        "--cluster",
        metavar="SITE",
        help="site profile: a name under configs/cluster/ or a YAML path "
        "(default: $SSL_CLUSTER, else built-in 8-GPU defaults)",
    )
    res.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    res.add_argument(
        "--gpus-per-node", type=int, metavar="G", help="GPUs per node = tasks (ranks) per node; 0: CPU nodes"
    )
    res.add_argument(
        "--tasks-per-node",
        type=int,
        metavar="T",
        help="ranks per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    res.add_argument(
        "--cpus-per-task", type=int, metavar="C", help="CPUs per rank (data loader workers + 1 or 2)"
    )
    res.add_argument("--mem", help="memory per node, SLURM form: 200G, 64000M, 0 (all)")
    res.add_argument("--time", help="time limit per attempt: minutes, HH:MM:SS or D-HH:MM:SS")
    res.add_argument("--partition", help="SLURM partition (checked with sinfo)")
    res.add_argument("--account", help="SLURM account")
    res.add_argument("--qos", help="SLURM quality of service")
    res.add_argument("--constraint", help="SLURM node features, e.g. h100")
    res.add_argument(
        "--signal-delay",
        type=int,
        dest="signal_delay_s",
        metavar="SECONDS",
        help="send USR2 this long before the time limit (the save must fit in it)",
    )
    res.add_argument(
        "--max-timeouts",
        type=int,
        metavar="N",
        help="time-limit requeues before the job fails (submitit max_num_timeout)",
    )
    res.add_argument(
        "--max-requeues",
        type=int,
        metavar="N",
        help="restarts of the job for any reason before a stop ends it",
    )

    mode = p.add_argument_group("mode")
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, SLURM parameters, world size, batch, steps and a "
        "GPU-hours estimate; submit nothing",
    )
    mode.add_argument("--local", action="store_true", help="run the job here as N processes, without SLURM")
    mode.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="--local: number of processes (default: nodes x tasks per node)",
    )
    mode.add_argument(
        "--eval",
        metavar="P1,P2",
        help="evaluation protocols (e.g. knn,linear; configs/eval/*.yaml), one job each: python -m evals.run "
        "--checkpoint runs/<name>/exports/latest --protocol P, started after pretraining succeeds; on a "
        "finished run (newest export at step >= train.steps) only these jobs, on its final export",
    )
    mode.add_argument(
        "--eval-args",
        metavar="ARGS",
        default="",
        help="more arguments for every eval job, e.g. --eval-args='--data data/fmnist'",
    )
    mode.add_argument(
        "--peak-tflops",
        type=float,
        metavar="TFLOPS",
        help="per-GPU peak for the estimate (profile; default 989, H100 bf16)",
    )
    mode.add_argument(
        "--mfu",
        type=float,
        metavar="FRACTION",
        dest="assumed_mfu",
        help="assumed MFU for the estimate (default 0.40)",
    )
    return p


def build_plan(args: argparse.Namespace):
    """Flags -> Plan (raises LaunchError / ConfigError on bad input)."""
    from launch.cluster_profile import load_profile
    from launch.plan import (
        Plan,
        eval_protocols,
        finished_step,
        profile_with_overrides,
        recipe_for_method,
        slurm_parameters,
    )
    from pretrain.config import load_config

    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: need at least 1 node")
    if args.nproc is not None and args.nproc < 1:
        raise LaunchError(f"--nproc {args.nproc}: need at least 1 process")
    if args.nproc is not None and not args.local:
        raise LaunchError(
            "--nproc is for --local runs; on SLURM use --nodes and --gpus-per-node/--tasks-per-node"
        )
    if args.local and args.eval:
        raise LaunchError("--eval submits SLURM jobs; with --local run `python -m evals.run` after training")
    base, source = load_profile(args.cluster)
    if args.gpus_per_node is not None and args.tasks_per_node is None:
        base = dataclasses.replace(base, tasks_per_node=None)  # one task per GPU given on the command line
    profile = profile_with_overrides(
        base,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        signal_delay_s=args.signal_delay_s,
        max_timeouts=args.max_timeouts,
        max_requeues=args.max_requeues,
        peak_tflops=args.peak_tflops,
        assumed_mfu=args.assumed_mfu,
    )
    if args.config:
        recipe = Path(args.config)
    elif args.method:
        recipe = recipe_for_method(args.method)
    else:
        raise LaunchError("say what to train: --method NAME (its default recipe) or --config RECIPE.yaml")
    world_size = args.nproc if args.local and args.nproc else args.nodes * profile.ranks_per_node
    overrides = list(args.overrides) + ([f"run.name={args.name}"] if args.name else [])
    cfg = load_config(recipe, overrides, world_size=world_size)
    if args.method and args.config and cfg.method.name != args.method:
        raise LaunchError(f"--method {args.method} but {recipe} trains method.name={cfg.method.name}")
    run_dir = Path(cfg.run.root) / cfg.run.name
    return Plan(
        recipe=recipe,
        cfg=cfg,
        profile=profile,
        profile_source=source,
        nodes=args.nodes,
        world_size=world_size,
        run_dir=run_dir,
        slurm=slurm_parameters(profile, cfg.run.name, args.nodes),
        evals=eval_protocols(args.eval),
        local_nproc=world_size if args.local else None,
        finished_step=finished_step(run_dir, int(cfg.train.steps)),
    ), overrides


def check_run_dir(plan) -> None:
    """Refuse, before submitting, a config that the run's saved config would refuse on resume.

    The trainer's own check (``pretrain.config.check_run_config``; writes nothing): ConfigError naming
    every changed key with both values.
    """
    from pretrain.config import check_run_config

    check_run_config(plan.cfg, plan.run_dir)


def jobs_file(run_dir: Path) -> Path:
    return run_dir / "slurm" / "jobs.jsonl"


def recorded_jobs(run_dir: Path) -> list[dict]:
    path = jobs_file(run_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _record(run_dir: Path, **fields) -> None:
    path = jobs_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def submit(plan, argv: list[str], eval_args: str = "") -> int:
    """Submit the pretraining job and its evals (only the evals for a finished run); print how to follow.

    Raises:
        LaunchError: the run is finished and no eval was asked for, or a job still trains it.
        SlurmUnavailable: a SLURM query failed.
    """
    import submitit

    from launch.cluster import queue_states
    from launch.jobs import PretrainJob
    from pretrain.config import to_yaml

    cfg, profile = plan.cfg, plan.profile
    folder = plan.run_dir / "slurm"
    workdir = os.getcwd()
    if plan.evals_only:
        print(
            f"run '{cfg.run.name}' is finished (export step {plan.finished_step} >= train.steps="
            f"{cfg.train.steps}): submitting its evals only, no training job"
        )
        failed = _submit_evals(plan, None, f"{plan.run_dir}/exports/step_{plan.finished_step:08d}", eval_args)
        print(f"status:   python launch/status.py {plan.run_dir}")
        return EXIT_FAILED if failed else EXIT_OK
    if plan.finished_step is not None:
        raise LaunchError(
            f"run '{cfg.run.name}' is finished: {plan.run_dir}/exports/step_{plan.finished_step:08d} is "
            f"complete and train.steps={cfg.train.steps}; nothing to train. Evaluate it with --eval "
            "PROTOCOLS (only the eval jobs are submitted), train a new run with another --name, or "
            "train this one longer: train.steps=N resume.allow_config_change=true (re-plans the schedules)."
        )
    previous = [j["job_id"] for j in recorded_jobs(plan.run_dir) if j.get("kind") == "pretrain"]
    active = queue_states(previous)
    if active:
        jid, state = next(iter(active.items()))
        raise LaunchError(
            f"job {jid} ({state}) is already training run '{cfg.run.name}' in {plan.run_dir}: wait for it, "
            f"`scancel {jid}`, or choose another --name"
        )
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_timeouts)
    executor.update_parameters(**plan.slurm)
    job = executor.submit(PretrainJob(to_yaml(cfg), workdir, profile.max_requeues, profile.gpus_per_node))
    jid = job.job_id
    _record(
        plan.run_dir,
        job_id=jid,
        kind="pretrain",
        nodes=plan.nodes,
        world_size=plan.world_size,
        method=cfg.method.name,
        recipe=str(plan.recipe),
        workdir=workdir,
        argv=argv,
    )
    tasks = plan.profile.ranks_per_node
    print(
        f"submitted job {jid}: run '{cfg.run.name}' ({cfg.method.name}, {plan.nodes} node(s) x {tasks} "
        f"task(s) = {plan.world_size} rank(s), {cfg.train.steps} steps)"
    )
    print(f"run dir:  {plan.run_dir}")
    print(f"logs:     {folder}/{jid}_0_log.out (rank 0; rank R: {jid}_R_log.out / .err)")
    print(f"follow:   tail -f {folder}/{jid}_0_log.out")
    print(f"status:   python launch/status.py {plan.run_dir}")
    print(f"stop:     scancel {jid}        (the ranks save, then the job ends; run this command to continue)")
    print(f"preempt:  scancel --signal=USR2 {jid}   (the ranks save, the job requeues and resumes)")
    failed = _submit_evals(plan, jid, f"{plan.run_dir}/exports/latest", eval_args)
    return EXIT_FAILED if failed else EXIT_OK


def _submit_evals(plan, after: str | None, checkpoint: str, eval_args: str) -> bool:
    """One job per ``plan.evals`` protocol on ``checkpoint`` (after job ``after`` succeeds, if given).

    Returns True when a submission failed (said on stderr; the other jobs stay submitted).
    """
    from evals.errors import EvalInputError
    from evals.submit import (
        SlurmUnavailableError,
        describe_request,
        eval_executor,
        eval_job_parameters,
        submit_eval,
    )
    from launch.jobs import eval_command

    cfg, profile = plan.cfg, plan.profile
    folder = plan.run_dir / "slurm"
    workdir = os.getcwd()
    failed = False
    for protocol in plan.evals:
        command = eval_command(sys.executable, checkpoint, protocol) + shlex.split(eval_args)
        try:
            params = eval_job_parameters(
                profile, f"{cfg.run.name}-eval-{protocol}", dependency=f"afterok:{after}" if after else None
            )
            job_id = submit_eval(
                eval_executor(folder, profile, params), command, workdir, describe_request(params)
            )
        except (
            EvalInputError,
            SlurmUnavailableError,
        ) as e:  # pretraining may be submitted: say it, keep going
            print(f"error: eval '{protocol}' was not submitted: {e}", file=sys.stderr)
            failed = True
            continue
        _record(plan.run_dir, job_id=job_id, kind="eval", protocol=protocol, after=after, command=command)
        when = f"starts after {after} succeeds" if after else "submitted"
        print(f"eval:     job {job_id} ({protocol}) {when}: {' '.join(command)}")
        print(f"          logs {folder}/{job_id}_0_log.out")
    return failed


def no_cluster_message(error: Exception) -> str:
    """What to do when no SLURM controller answered (nothing was submitted)."""
    return (
        f"{error}\nNothing was submitted. Instead:\n"
        "  --dry-run          show what would be submitted (needs no cluster)\n"
        "  --local --nproc N  run the same job as N processes on this machine, without SLURM\n"
        "  --cluster local    the single-machine test cluster; start it first: "
        "sudo launch/local_cluster.sh start\n"
        "or point SLURM_CONF at your cluster's slurm.conf."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_intermixed_args(argv)
    try:
        return _main(args, argv)
    except BrokenPipeError:  # `... --dry-run | head`: the reader left; say nothing more
        _silence_stdout()
        return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from launch.cluster import SlurmUnavailable, check_partition, probe_controller, slurm_installed
    from pretrain.config import ConfigError

    try:
        plan, overrides = build_plan(args)
        needs_slurm = not args.local
        if needs_slurm and not args.dry_run and not slurm_installed():
            raise LaunchError(
                "SLURM is not installed here (no sbatch/srun on PATH). Use --local to run the job on this "
                "machine, or --dry-run to see what would be submitted."
            )
        partition_note = ""
        if needs_slurm:
            try:
                probe_controller()  # one bounded ping: sinfo alone would retry for ~9 s
                plan.slurm["partition"] = check_partition(plan.profile.partition)
            except SlurmUnavailable as e:
                if not args.dry_run:
                    print(f"error: {no_cluster_message(e)}", file=sys.stderr)
                    return EXIT_FAILED
                partition_note = f"(partition not checked: {e})"
        if not plan.evals_only:
            check_run_dir(plan)
        est = None
        if args.dry_run and not plan.evals_only:
            from launch.plan import estimate, method_flops_per_sample

            est = estimate(
                method_flops_per_sample(plan.cfg),
                int(plan.cfg.train.steps),
                int(plan.cfg.train.global_batch_size),
                plan.world_size,
                plan.profile.peak_tflops,
                plan.profile.assumed_mfu,
            )
    except (LaunchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    shards = str(plan.cfg.data.shards or "")
    if (
        not plan.evals_only
        and plan.cfg.data.backend == "wds"
        and shards
        and not any(c in shards for c in "*?[{")
        and not Path(shards).exists()
    ):
        print(
            f"warning: data.shards={shards} does not exist here; the job fails unless the compute nodes see it",
            file=sys.stderr,
        )
    if args.dry_run:
        print(plan.describe(est))
        if partition_note:
            print(partition_note)
        print("\ndry run: nothing submitted")
        return EXIT_OK
    if args.local:
        from launch.local import run_local

        print(f"local run: {plan.world_size} process(es), run dir {plan.run_dir}", flush=True)
        return run_local(str(plan.recipe), overrides, plan.world_size)
    try:
        return submit(plan, argv, args.eval_args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

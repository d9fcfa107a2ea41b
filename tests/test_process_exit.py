"""How a finished training process ends: everything flushed, exit code kept, no interpreter teardown.

Interpreter teardown with process-group threads still alive can abort a process whose run finished
(SIGABRT, seen once in CI on a 2-rank run). These run real child processes: buffered pipes, a
logging handler, an atexit hook that would abort if teardown ran.
"""

from __future__ import annotations

import sys

from tests.conftest import python_env, run_cmd


def _run(code: str) -> tuple[int, str, str]:
    env = python_env()
    env.pop("PYTHONUNBUFFERED")  # stdout to a pipe is block-buffered: exit_process must flush it
    proc = run_cmd([sys.executable, "-c", code], check=False, timeout=60, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_exit_process_flushes_output_and_keeps_the_code():
    rc, out, err = _run(
        "import atexit, logging, os\n"
        "from pretrain.distributed import exit_process\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "atexit.register(os.abort)  # interpreter teardown would abort: it must not run\n"
        "print('x' * 100)\n"
        "logging.getLogger('pretrain').info('finished: 3 steps')\n"
        "exit_process(3)\n"
    )
    assert rc == 3, err
    assert out == "x" * 100 + "\n"
    assert "finished: 3 steps" in err


def test_exit_process_at_exit_skips_teardown_after_the_host_is_done():
    # A host like submitit writes its result after our function returns; the exit comes after that.
    rc, out, err = _run(
        "import atexit, os, sys\n"
        "from pretrain.distributed import exit_process_at_exit\n"
        "atexit.register(os.abort)\n"
        "exit_process_at_exit(0)\n"
        "print('result written')\n"
        "sys.exit(0)\n"
    )
    assert rc == 0, err
    assert out == "result written\n"


def test_train_cli_exit_codes_survive_the_fast_exit(tmp_path):
    # Bad input: exit 2 with the message on stderr, through the same exit path as a finished run.
    env = python_env()
    env.pop("PYTHONUNBUFFERED")
    missing = tmp_path / "nope.yaml"
    proc = run_cmd([sys.executable, "-m", "pretrain.train", "--config", str(missing)], check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr

"""Load a checkpoint through CheckpointManager at the current world size and dump the full
(unsharded) model and optimizer state to a file, so a test can compare loads at different world sizes.

usage: [torchrun --nproc_per_node N] tests/helpers/dump_loaded_state.py CONFIG CKPT_DIR OUT.pt [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.checkpoint import CheckpointManager
from pretrain.config import load_config
from pretrain.distributed import init_distributed, shutdown, world_size_from_env
from pretrain.engines import build_engine
from pretrain.methods import build_method


def main() -> None:
    config, ckpt, out, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides, world_size=world_size_from_env())
    env = init_distributed(60)
    torch.manual_seed(123)  # different init than training: everything must come from the checkpoint
    engine = build_engine(cfg, env)
    engine.setup(build_method(cfg))
    CheckpointManager(Path(ckpt).parents[1], env).load(Path(ckpt), engine)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer, options=opts)
    if env.is_main:
        torch.save({"model": model_sd, "optim": optim_sd}, out)
    shutdown()


if __name__ == "__main__":
    main()

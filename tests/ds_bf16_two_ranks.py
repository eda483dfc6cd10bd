"""Two CPU ranks of DeepSpeed's bf16 optimizer (ZeRO-1 with bf16 weights and fp32 gradient
accumulation), DeepSpeed alone: 3 updates, then a checkpoint directory of the 2 ranks' shards, for
tests/test_deepspeed.py to convert (Lightning's strategy refuses a CPU, and on one rank the
shards' join is not exercised).

    DS_ACCELERATOR=cpu python tests/ds_bf16_two_ranks.py OUT_DIR PORT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp


def worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # (as tests/ds_lightning_check.py)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    # 1,154 parameters: not a multiple of the ranks' alignment, so the flat group has padding
    model = torch.nn.Sequential(torch.nn.Embedding(50, 7), torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 50))
    config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
              "data_types": {"grad_accum_dtype": "fp32"}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer", type(engine.optimizer)
    g = torch.Generator().manual_seed(rank)  # each rank its own batches
    for _ in range(3):
        x = torch.randint(0, 50, (4, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x).flatten(0, 1).float(), x.flatten())
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="checkpoint")


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)

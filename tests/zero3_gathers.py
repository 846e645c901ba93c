"""Run by tests/test_bench.py under `deepspeed --num_gpus 2`: how many all-gathers step 3's generation makes under actor
ZeRO-3, for answers of 4 and of 16 tokens. Prints one JSON line on rank 0: {"4": count, "16": count}."""

import json
import tempfile

import deepspeed.comm as dist_comm
import torch

import common  # the repository root is on PYTHONPATH (tests/conftest.py's run_stage)
import models
import ppo

COUNT = {"n": 0}
for name in ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_gather_coalesced"):
    if hasattr(dist_comm, name):
        original = getattr(dist_comm, name)

        def counted(*args, _original=original, **kwargs):
            COUNT["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist_comm, name, counted)

device = common.init_distributed(0)
counts = {}
with tempfile.TemporaryDirectory() as tmp:
    for tokens in (4, 16):
        flags = ["--actor", "tiny:gpt2", "--reward", "tiny:gpt2", "--actor_zero_stage", "3", "--output_dir", tmp]
        flags += ["--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"]
        args = ppo.parse_args(flags + ["--max_answer_seq_len", str(tokens)])
        tokenizer = models.load_tokenizer(args.actor)
        engine = ppo.RLHFEngine(args.actor, args.critic, args.reward, tokenizer, args, 10, device)
        trainer = ppo.PPOTrainer(engine, args)
        trainer.generate_kwargs = {"min_new_tokens": tokens}
        query = torch.full((2, 5), 70, device=device)
        trainer.sample(query, torch.ones_like(query))  # warm-up
        COUNT["n"] = 0
        response, mask = trainer.sample(query, torch.ones_like(query))
        assert mask.sum(1).eq(tokens).all()
        counts[str(tokens)] = COUNT["n"]
if common.rank() == 0:
    print("GATHERS " + json.dumps(counts))

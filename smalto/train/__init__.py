"""Training: `train(cfg)` runs a recipe (`smalto.config.RunConfig`) on one process or under torchrun.

    parallel.py    process group, meta-device build, activation checkpointing → per-block compile → FSDP2
    optim.py       DecoupledLionW (llm-foundry's LION), AdamW, warmup + cosine/linear/constant/inverse-sqrt
    setup.py       recipe → Trainer (model, optimizer, data streams, checkpoints, logger), autoresume
    loop.py        train(), train_step(), evaluate(), finish()
    checkpoint.py  DCP checkpoints (atomic, `latest`, keep K, any world size), HF export (`smalto.load` reads them)
    resume.py      the same checkpoints and resume for `smalto reward` and `smalto ppo`'s own loops
    guard.py       NaN / loss-spike guard
    metrics.py     JSONL / TensorBoard / W&B, progress bar, MFU, summary
Submodules are imported explicitly so `smalto --help` stays free of torch.
"""

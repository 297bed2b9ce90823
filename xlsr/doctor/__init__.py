"""``python -m xlsr.doctor``: is this machine ready for xlsr, and how fast is it?

It prints the versions (Python, torch, CUDA, cuDNN, NCCL, the libraries xlsr uses), the CPU and the devices, then
runs short checks of the real code paths on the chosen device, each PASS / FAIL / SKIP with its reason and seconds
(:mod:`.checks`); ``--bench`` times the XLS-R 300M pretraining and CTC fine-tuning steps and gives their MFU
(:mod:`.bench`). ``--json OUT`` writes all of it. The exit code is 0 when no check fails, else 1.

    environment  versions, CPU flags, devices
    checks       the checks (forward vs float64, train steps per precision, SDPA kernels, torch.compile,
                 DDP, FSDP2 and checkpoint resume through the training engine, data loading)
    bench        the timed steps, model FLOP/s and MFU
    cli          the command line, the table and the JSON file
"""

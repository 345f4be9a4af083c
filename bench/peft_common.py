"""Shared by bench/peft_lora.py and bench/peft_multi.py: CUDA-event timing and the
one-Linear module that PEFT wraps."""
import torch


def time_ms(fn, batch=10, batches=15, warmup=3):
    """Median milliseconds per call of fn(k) over `batches` batches of `batch` calls, after
    `warmup` calls; k counts calls (for rotating inputs)."""
    k = 0
    for _ in range(warmup):
        fn(k)
        k += 1
    torch.cuda.synchronize()
    times = []
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(batches):
        a.record()
        for _ in range(batch):
            fn(k)
            k += 1
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    times.sort()
    return times[len(times) // 2]


class One(torch.nn.Module):
    """A model of one bias-free Linear named `proj` (PEFT's target module)."""

    def __init__(self, i, o):
        super().__init__()
        self.proj = torch.nn.Linear(i, o, bias=False)

    def forward(self, x):
        return self.proj(x)

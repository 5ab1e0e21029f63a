"""The loss at NVILA's real vocabulary: full-vocabulary logits for every position (what transformers computes) beside
nvila-ft's selective chunked loss (`trainer.selective_loss`), one JSON line each.

Only the head runs: hidden states [1, positions, hidden] (bf16, requiring grad) -> lm_head (151,648 x hidden, bf16)
-> cross-entropy over the supervised positions, forward and backward. Peak tensor bytes over that work (profiler
memory timeline on the CPU, `max_memory_allocated` on a GPU) beyond the inputs and weights, and the time.

    .venv/bin/python bench/loss_memory.py --positions 3000 --supervised 64 --hidden 1536
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from nvila_ft.model.losses import selective_cross_entropy
from nvila_ft.training.peak import peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=3000)
    parser.add_argument("--supervised", type=int, default=64, help="supervised positions (an answer at the end)")
    parser.add_argument("--hidden", type=int, default=1536, help="1536: NVILA-Lite-2B; 3584: NVILA-8B")
    parser.add_argument("--vocab", type=int, default=151648)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = args.device, torch.bfloat16
    lm_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(1, args.positions, args.hidden, device=device, dtype=dtype, requires_grad=True)
    labels = torch.full((1, args.positions), -100, device=device)
    labels[0, -args.supervised:] = torch.randint(0, args.vocab, (args.supervised,), device=device)

    def full() -> torch.Tensor:  # the full path: logits of every position, upcast, shifted cross-entropy
        logits = lm_head(hidden).float()
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)

    def selective() -> torch.Tensor:
        return selective_cross_entropy(hidden, labels, lm_head)

    results = {}
    for name, loss_fn in (("full", full), ("selective", selective)):
        def work():
            hidden.grad = None
            loss = loss_fn()
            loss.backward()
            return loss

        work()  # warm-up
        start = time.perf_counter()
        loss = work()
        seconds = time.perf_counter() - start
        results[name] = {"loss": float(loss), "peak_bytes": peak_bytes(work, device), "seconds": round(seconds, 3), "grad": hidden.grad.clone()}
    difference = float((results["full"]["grad"].float() - results["selective"]["grad"].float()).abs().max())
    for name in ("full", "selective"):
        row = {k: v for k, v in results[name].items() if k != "grad"}
        print(json.dumps({"loss_path": name, "positions": args.positions, "supervised": args.supervised, "hidden": args.hidden,
                          "vocab": args.vocab, "device": device, **row, "max_grad_difference": difference}))


if __name__ == "__main__":
    main()

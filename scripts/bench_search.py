"""Search throughput: candidates decoded and classified per second by the shell search, against the raw
batched forward throughput of decoder + classifier at the same batch size.

Models are built untrained (throughput does not depend on the weights) at the shapes of the default
config: SmallCNN and the 28x28 ConvVAE with 16 latent dims.

Run: ``python scripts/bench_search.py [--sources 512] [--budget 256] [--width 32]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from defuse.config import IdentifyConfig
from defuse.identify import SearchModule
from defuse.models import ConvVAE, build_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=512)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--width", type=int, default=32, help="classifier width")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    classifier = build_classifier("small_cnn", 1, 10, [0.13], [0.3], width=args.width).eval().requires_grad_(False)
    vae = ConvVAE(1, 28, 16, 32).eval().requires_grad_(False)
    config = IdentifyConfig(budget=args.budget, batch_sources=64)
    # No flips would stop sources early with random weights, so every source spends its whole shell budget:
    # the candidate batch is batch_sources x directions, as in a real search's first shells.
    module = SearchModule(classifier, vae, config, seed=0)
    images = torch.rand(args.sources, 1, 28, 28)
    labels = torch.zeros(args.sources, dtype=torch.long)
    index = torch.arange(args.sources)
    per_failure = config.refine_steps + (1 if config.depth > 0 else 0)
    directions = max(1, (config.budget - config.failures_per_source * per_failure) // config.shells)
    batch = config.batch_sources * directions

    def search() -> int:
        queries = 0
        with torch.inference_mode():
            for i in range(0, args.sources, config.batch_sources):
                sl = slice(i, i + config.batch_sources)
                out = module.predict_step((images[sl], labels[sl], index[sl]), i // config.batch_sources)
                queries += int(out["queries"].sum())
        return queries

    def raw(n: int) -> None:
        z = torch.randn(batch, 16)
        with torch.inference_mode():
            for _ in range(n):
                classifier(vae.decode(z))

    search()  # warm-up
    raw(1)
    best_search, best_raw = 0.0, 0.0
    for _ in range(args.repeats):
        t = time.perf_counter()
        queries = search()
        best_search = max(best_search, queries / (time.perf_counter() - t))
        n = max(1, queries // batch)
        t = time.perf_counter()
        raw(n)
        best_raw = max(best_raw, n * batch / (time.perf_counter() - t))
    print(json.dumps({
        "batch_size": batch, "sources": args.sources, "budget_per_source": args.budget,
        "search_candidates_per_second": round(best_search, 1),
        "raw_forward_per_second": round(best_raw, 1),
        "ratio": round(best_search / best_raw, 3),
        "threads": torch.get_num_threads(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search throughput: candidates decoded and classified per second by the shell search, against the raw
batched forward throughput of decoder + classifier at the same batch sizes.

Models are built untrained (throughput does not depend on the weights) at the shapes of the default
config: SmallCNN and the 28x28 ConvVAE with 16 latent dims. Half the sources are labelled with the class the
untrained classifier reads everywhere (they never flip: exploration only), half with another class (they flip
at once: bisection and the whole walk). Screening runs (its judge's work is in the search's time) with a
threshold of 0, so no candidate is screened out. The raw forward replays the exact sequence of batch sizes the
search asked the classifier about.

Run: ``python scripts/bench_search.py [--sources 512] [--budget 256] [--width 32]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from defuse.config import IdentifyConfig
from defuse.models import ConvVAE, build_classifier
from defuse.search import SearchModule
from defuse.validity import ValidityModel


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
    config = IdentifyConfig(budget=args.budget, batch_sources=64, validity_threshold=0.0)
    rng = torch.Generator().manual_seed(1)
    judge = ValidityModel.fit(torch.randn(500, 16, generator=rng).numpy(), (torch.arange(500) % 10).numpy(), 10).judge()
    module = SearchModule(classifier, vae, config, seed=0, judge=judge)
    images = torch.rand(args.sources, 1, 28, 28)
    with torch.inference_mode():
        everywhere = int(classifier(vae.decode(torch.zeros(1, 16))).argmax())
    index = torch.arange(args.sources)
    labels = (everywhere + index % 2) % 10
    batches: list[int] = []
    classifier.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))

    def search() -> int:
        queries = 0
        with torch.inference_mode():
            for i in range(0, args.sources, config.batch_sources):
                sl = slice(i, i + config.batch_sources)
                out = module.predict_step((images[sl], labels[sl], index[sl]), i // config.batch_sources)
                queries += int(out["queries"].sum())
        return queries

    def raw(sizes: list[int]) -> None:
        z = torch.randn(max(sizes), 16)
        with torch.inference_mode():
            for n in sizes:
                classifier(vae.decode(z[:n]))

    search()  # warm-up
    best_search, best_raw = 0.0, 0.0
    for _ in range(args.repeats):
        batches.clear()
        t = time.perf_counter()
        queries = search()
        best_search = max(best_search, queries / (time.perf_counter() - t))
        sizes = list(batches)
        t = time.perf_counter()
        raw(sizes)
        best_raw = max(best_raw, sum(sizes) / (time.perf_counter() - t))
    print(json.dumps({
        "forward_batches": len(sizes), "mean_batch_size": round(sum(sizes) / len(sizes), 1),
        "sources": args.sources, "budget_per_source": args.budget,
        "search_candidates_per_second": round(best_search, 1),
        "raw_forward_per_second": round(best_raw, 1),
        "ratio": round(best_search / best_raw, 3),
        "threads": torch.get_num_threads(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's plot: I-BAU (fast path, published defaults: 5 rounds) on the shared BadNets checkpoint, with 1,000
clean images and an evaluation on 1,000 test images after every round, saved and drawn with ``fastpurify plot``.

    python examples/ibau_plot.py [--data ../shared/data] [--out docs/img/ibau_badnets]
    # writes OUT.pt + OUT.json (PurifyResult.save) and OUT.png (fastpurify.plot.plot_result)
"""

import argparse

import torch

import fastpurify
from fastpurify.data import load_cifar10
from fastpurify.metrics import evaluate
from fastpurify.models import load_checkpoint
from fastpurify.plot import plot_result

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data", default="../shared/data", help="folder holding ibau/ and cifar10/ (default ../shared/data)")
ap.add_argument("--out", default="docs/img/ibau_badnets", help="output path without suffix")
ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
trigger, target = "patch:size=4,row=27,col=27,value=1", 8
model = load_checkpoint(f"{args.data}/ibau/badnets_8_02_ckpt.pth", arch="small_vgg")
x, y = load_cifar10(f"{args.data}/cifar10", split="train", count=1000)
xt, yt = load_cifar10(f"{args.data}/cifar10", split="test", count=1000)
result = fastpurify.ibau(model, (x, y), seed=0, eval_data=(xt, yt, trigger, target), eval_every=1)
result.save(f"{args.out}.pt")
before = evaluate(model, xt, yt, trigger=trigger, target=target)
after = evaluate(result.model, xt, yt, trigger=trigger, target=target)
print(plot_result(result, f"{args.out}.png", before=before, after=after))

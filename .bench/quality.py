"""Sample quality of dcgan.py, and of the PyTorch DCGAN example run the same way beside it.

The measure is a Frechet distance (the formula of FID) in the features of a small convolutional
network that this benchmark trains itself, on held-out real images, to tell their rotation
(0, 90, 180 or 270 degrees): a task that needs the layout of a face, and labels that need no
download. Lower is better. Before any run it prints two anchors that show the measure can fail:
the distance between two disjoint halves of the real images (the floor) and to an untrained G.

Every training run is a subprocess of the script's own command line, on the same folder of
images, with seeds 1..N; each trained G (dcgan.py's checkpoint, or the example's last
netG_epoch_N.pth) draws --samples images with BatchNorm in eval mode and in batch mode, both scored.

  python .bench/quality.py --variant default: --variant ema:--ema,0.999 --seeds 3 --niter 1 \\
      --example /path/to/examples/dcgan/main.py --example-args=--accel

The data is --dataroot (a folder of images, e.g. CelebA's img_align_celeba) or, by default,
dcgan.py's synthetic faces written to a folder; --data digits makes a second, unlike set instead:
one- and two-digit numbers in Pillow's built-in font, in random colours, sizes, places and slants.
Results go to --work/results.json and a table.

--per-epoch also scores every epoch's G of each dcgan.py run (netG_epoch_N.pth, BatchNorm in batch
mode, as dcgan.py's own score samples) and prints, per seed, the benchmark's distance of each epoch
beside the score in the run's scores.csv, their rank correlation, and the benchmark's distance of
netG_best.pth against the last epoch's G and the run's best epoch:

  python .bench/quality.py --work /tmp/q32 --imageSize 32 --train-images 8192 --niter 10 \\
      --seeds 5 --per-epoch --variant fp32:--amp,off --variant bf16:--amp,bf16
"""
import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import dcgan  # noqa: E402


def synthetic_digits(n, size, seed):
    """n numbers from 0 to 99 as uint8 (n, 3, size, size): thin strokes on a plain background, a
    data set unlike the faces in everything but the size. Seeded; no download."""
    rng, out = random.Random(seed), torch.empty(n, 3, size, size, dtype=torch.uint8)
    fonts = [ImageFont.load_default(size=s) for s in range(size // 3, 3 * size // 4 + 1)]
    for i in range(n):
        text = str(rng.randrange(100))
        font = rng.choice(fonts)
        mask = Image.new("L", (2 * size, 2 * size))
        ImageDraw.Draw(mask).text((size + rng.uniform(-0.15, 0.15) * size, size + rng.uniform(-0.15, 0.15) * size),
                                  text, fill=255, font=font, anchor="mm")
        mask = mask.rotate(rng.uniform(-20, 20), Image.BICUBIC).crop((size // 2, size // 2, 3 * size // 2, 3 * size // 2))
        back = torch.tensor([rng.random() for _ in range(3)])
        ink = torch.tensor([rng.random() for _ in range(3)])
        while (ink - back).abs().max() < 0.5:  # keep the number readable
            ink = torch.tensor([rng.random() for _ in range(3)])
        alpha = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, size, size) / 255
        out[i] = ((back.view(3, 1, 1) * (1 - alpha) + ink.view(3, 1, 1) * alpha) * 255).round().to(torch.uint8)
    return out


def real_images(opt):
    """The training folder (made from the synthetic set of --data unless --dataroot) and a held-out
    set of real images as uint8 (N, 3, S, S), cropped and resized as G sees them."""
    if opt.dataroot:
        folder = opt.dataroot
    else:
        folder = os.path.join(opt.work, "data")
        if not os.path.isdir(os.path.join(folder, opt.data)):
            make = dcgan.synthetic_faces if opt.data == "faces" else synthetic_digits
            images = make(opt.train_images, opt.imageSize, seed=12345)
            dcgan.write_png_folder(os.path.join(folder, opt.data), images.split(1024))
    args = dcgan.parse_args(["--dataset", "folder", "--dataroot", folder, "--imageSize", str(opt.imageSize),
                             "--cache-dir", os.path.join(opt.work, "cache"), "--workers", "2"])
    dataset = dcgan.open_dataset(args)
    data = dcgan.preloaded(args, dataset, dcgan.data_keys(args, dataset)[1], torch.device("cpu"),
                           lambda *a: None)
    held_out = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(7))[:2 * opt.samples]]
    return folder, held_out


class RotationNet(nn.Module):
    """Four strided convolutions and a pooled 256-d feature; the head tells the rotation."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(width, out, 3, 2, 1), nn.BatchNorm2d(out), nn.ReLU(True)]
            width = out
        self.body, self.head = nn.Sequential(*layers), nn.Linear(256, 4)

    def features(self, x):
        return self.body(F.interpolate(x, size=32, mode="bilinear", antialias=True)).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def rotated(x, k):
    return torch.rot90(x, k, (2, 3))


def train_features(images, steps=600, seed=0):
    torch.manual_seed(seed)
    net, x = RotationNet(), images.float() / 127.5 - 1
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for step in range(steps):
        batch = x[torch.randint(len(x), (128,))]
        k = torch.randint(4, (128,))
        inputs = torch.cat([rotated(batch[k == r], r) for r in range(4)])
        labels = torch.cat([torch.full(((k == r).sum(),), r) for r in range(4)])
        loss = F.cross_entropy(net(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        k = torch.arange(len(x)) % 4
        accuracy = (net(torch.cat([rotated(x[k == r], r) for r in range(4)])).argmax(1)
                    == torch.cat([torch.full(((k == r).sum(),), r) for r in range(4)])).float().mean().item()
    return net, accuracy


@torch.no_grad()
def features(net, images):
    """images in [-1, 1] floats or uint8."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    return torch.cat([net.features(b) for b in x.split(500)]).double()


def frechet(a, b):
    """|mu_a - mu_b|^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2), in float64."""
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * middle).item()


@torch.no_grad()
def scores(netG, net, real_features, n, seed=0):
    z = torch.randn(n, netG.main[0].in_channels, 1, 1, generator=torch.Generator().manual_seed(seed))
    out = {}
    for bn in ("eval", "batch"):
        fake = torch.cat([dcgan.sample(netG, part, bn == "batch") for part in z.split(256)])
        out[bn] = frechet(real_features, features(net, fake))
    return out


def spearman(a, b):
    """Rank correlation of two equal-length lists (no ties expected)."""
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def per_epoch(opt, outf, net, real):
    """The benchmark's distance of each epoch's G and of netG_best.pth, beside the run's scores."""
    bench = [scores(dcgan.load_generator(os.path.join(outf, f"netG_epoch_{e}.pth"))[0], net, real,
                    opt.samples)["batch"] for e in range(opt.niter)]
    with open(os.path.join(outf, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    score = [float(r["score"]) for r in rows]
    best = min(range(len(score)), key=score.__getitem__)
    kept = scores(dcgan.load_generator(os.path.join(outf, "netG_best.pth"))[0], net, real, opt.samples)["batch"]
    return {"bench": bench, "score": score, "spearman": spearman(bench, score), "best_epoch": best,
            "netG_best": kept, "last": bench[-1], "min": min(bench)}


def print_per_epoch(name, runs):
    for seed, r in enumerate(runs, 1):
        print(f"{name} seed {seed}: benchmark per epoch {' '.join(f'{b:.1f}' for b in r['bench'])}")
        print(f"{' ' * len(name)}         score per epoch {' '.join(f'{s:.1f}' for s in r['score'])}")
        print(f"{' ' * len(name)}         Spearman {r['spearman']:.2f}; netG_best.pth (epoch "
              f"{r['best_epoch']}) {r['netG_best']:.2f}, last {r['last']:.2f}, run's best {r['min']:.2f}")
    rho = statistics.median(r["spearman"] for r in runs)
    no_worse = sum(r["netG_best"] <= r["last"] for r in runs)
    ratio = statistics.median(r["netG_best"] / r["min"] for r in runs)
    print(f"{name}: median Spearman {rho:.2f}; netG_best.pth no worse than the last G on {no_worse} of "
          f"{len(runs)} seeds; median netG_best / run's best {ratio:.3f}", flush=True)


def run(opt, name, flags, seed, folder):
    """Trains one variant for one seed (skipped when its output is there) and returns its G."""
    outf = os.path.join(opt.work, f"{name}-seed{seed}")
    if name == "example":
        weights = os.path.join(outf, f"netG_epoch_{opt.niter - 1}.pth")
        cmd = [sys.executable, opt.example, "--dataset", "folder", "--dataroot", folder, "--imageSize",
               str(opt.imageSize), "--batchSize", str(opt.batchSize), "--niter", str(opt.niter),
               "--manualSeed", str(seed), "--outf", outf] + opt.example_args.split()
    else:
        weights = os.path.join(outf, "checkpoint.pt")
        cmd = [sys.executable, os.path.join(HERE, "dcgan.py"), "--dataset", "folder", "--dataroot", folder,
               "--imageSize", str(opt.imageSize), "--batchSize", str(opt.batchSize), "--niter", str(opt.niter),
               "--manualSeed", str(seed), "--outf", outf, "--cache-dir", os.path.join(opt.work, "cache"),
               "--log-every", "100"] + flags
    if not os.path.exists(weights):
        os.makedirs(outf, exist_ok=True)
        start = time.time()
        with open(os.path.join(outf, "log.txt"), "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
        print(f"  trained {name} seed {seed} in {time.time() - start:.0f} s", flush=True)
    return dcgan.load_generator(weights)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(HERE, ".bench", "work"), help="folder for data, runs, results")
    p.add_argument("--dataroot", default="", help="a folder of images (default: synthetic faces)")
    p.add_argument("--data", choices=["faces", "digits"], default="faces", help="the synthetic set, without --dataroot")
    p.add_argument("--train-images", type=int, default=35840, help="synthetic images to make (default: 560 batches of 64)")
    p.add_argument("--imageSize", type=int, default=64)
    p.add_argument("--batchSize", type=int, default=64)
    p.add_argument("--niter", type=int, default=1, help="epochs of every run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=2000, help="images on each side of a distance")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:FLAGS for dcgan.py, FLAGS comma-separated, e.g. ema:--ema,0.999 (default: default:)")
    p.add_argument("--example", default="", help="path of pytorch/examples dcgan/main.py, run as the anchor")
    p.add_argument("--example-args", default="", help="extra flags for the example, e.g. --accel")
    p.add_argument("--per-epoch", action="store_true", help="also score every epoch of each dcgan.py run")
    opt = p.parse_args()
    os.makedirs(opt.work, exist_ok=True)
    folder, held_out = real_images(opt)
    net, accuracy = train_features(held_out[opt.samples:])
    real = features(net, held_out[:opt.samples])
    print(f"feature net: rotation accuracy {accuracy:.3f} on its training images")
    half = opt.samples // 2
    untrained = dcgan.Generator(100, 64, 3, opt.imageSize).apply(dcgan.weights_init)
    results = {"floor (real vs real)": frechet(real[:half], features(net, held_out[opt.samples:opt.samples + half])),
               "untrained G": scores(untrained, net, real, opt.samples)["eval"]}
    print(" | ".join(f"{k}: {v:.3f}" for k, v in results.items()), flush=True)
    variants = [v.split(":", 1) for v in (opt.variant or ["default:"])]
    if opt.example:
        variants = [["example", ""]] + variants
    table, epochs = {}, {}
    for name, flags in variants:
        for seed in range(1, opt.seeds + 1):
            got = scores(run(opt, name, [f for f in flags.split(",") if f], seed, folder), net, real, opt.samples)
            table.setdefault(name, []).append(got)
            print(f"{name} seed {seed}: eval {got['eval']:.3f}  batch {got['batch']:.3f}", flush=True)
            if opt.per_epoch and name != "example":
                epochs.setdefault(name, []).append(per_epoch(opt, os.path.join(opt.work, f"{name}-seed{seed}"),
                                                             net, real))
        if name in epochs:
            print_per_epoch(name, epochs[name])
    print(f"\n{'variant':<22} {'BN eval: median [min, max]':<30} {'BN batch: median [min, max]'}")
    for name, rows in table.items():
        cells = []
        for bn in ("eval", "batch"):
            v = [r[bn] for r in rows]
            cells.append(f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        print(f"{name:<22} {cells[0]:<30} {cells[1]}")
    with open(os.path.join(opt.work, "results.json"), "w") as f:
        json.dump({"anchors": results, "runs": table, "per_epoch": epochs, "flags": vars(opt)}, f, indent=1)


if __name__ == "__main__":
    main()

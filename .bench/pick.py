"""Which epoch would each measure keep? Scores every epoch's netG_epoch_N.pth of the runs that
`quality.py --per-epoch --variant NAME:...` trained, offline, with candidate measures, beside the
benchmark, and prints per seed and over the seeds: the rank correlation with the benchmark, whether
the measure's pick is no worse than the last G, and the pick's benchmark against the run's best.

  python .bench/pick.py --work /tmp/q32 --variant fp32 --seeds 1,2,3,4,5 --imageSize 32 --niter 10

Measures: dcgan.py's score (sliced Wasserstein on pyramid patches, as in scores.csv); the same with
both sets normalised by the real set's statistics; a Frechet distance in a rotation network trained
300 steps on the run's own images besides the 1,000 scored (seeded by the run's seed); the benchmark
with its feature network seeded 1 (how well the benchmark reproduces itself).
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from quality import dcgan  # noqa: E402


def rotation_net(images, seed, steps):
    """quality.py's RotationNet trained on uint8 images to tell their rotation."""
    torch.manual_seed(seed)
    net, x = quality.RotationNet(), images.float() / 127.5 - 1
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        batch, k = x[torch.randint(len(x), (128,))], torch.randint(4, (128,))
        inputs = torch.cat([quality.rotated(batch[k == r], r) for r in range(4)])
        labels = torch.cat([torch.full(((k == r).sum(),), r) for r in range(4)])
        loss = F.cross_entropy(net(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def patches_normalised_by(images, seed, stats=None):
    """dcgan.patches, each channel normalised by `stats` (per level) if given, else by its own;
    returns the patches and the statistics used."""
    rng, out, used = torch.Generator().manual_seed(seed), [], []
    for i, level in enumerate(dcgan.pyramid(images)):
        n, starts = len(level), level.shape[-1] - 6
        rows = torch.randint(starts, (n, 128), generator=rng)
        cols = torch.randint(starts, (n, 128), generator=rng)
        windows = level.unfold(2, 7, 1).unfold(3, 7, 1).permute(0, 2, 3, 1, 4, 5)
        picked = windows[torch.arange(n)[:, None], rows, cols].flatten(0, 1)
        mean, std = stats[i] if stats else (picked.mean((0, 2, 3), keepdim=True),
                                            picked.std((0, 2, 3), keepdim=True).clamp(min=1e-6))
        used.append((mean, std))
        out.append(((picked - mean) / std).flatten(1))
    return out, used


@torch.no_grad()
def samples(netG, n, batch_size):
    z = torch.randn(n, netG.main[0].in_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    return torch.cat([dcgan.sample(netG, part, True).float() for part in z.split(batch_size)])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="quality.py's --work")
    p.add_argument("--variant", default="fp32", help="the NAME of quality.py's --variant")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--imageSize", type=int, default=32)
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--batchSize", type=int, default=64, help="the runs' batch size")
    opt = p.parse_args()
    bench_opt = argparse.Namespace(dataroot="", work=opt.work, data="faces", samples=2000,
                                   train_images=opt.train_images, imageSize=opt.imageSize)
    folder, held_out = quality.real_images(bench_opt)
    benchmarks = []
    for net in (quality.train_features(held_out[2000:])[0], rotation_net(held_out[2000:], 1, 600)):
        benchmarks.append((net, quality.features(net, held_out[:2000])))
    args = dcgan.parse_args(["--dataset", "folder", "--dataroot", folder, "--imageSize",
                             str(opt.imageSize), "--cache-dir", os.path.join(opt.work, "cache")])
    dataset = dcgan.open_dataset(args)
    data = dcgan.preloaded(args, dataset, dcgan.data_keys(args, dataset)[1], torch.device("cpu"),
                           lambda *a, **k: None)
    measures = ["benchmark", "score", "score, real statistics", "rotation net", "benchmark, net 1"]
    runs = []
    for seed in map(int, opt.seeds.split(",")):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        real = data[order[:1000]]  # the images dcgan.py scores against
        real_patches, stats = patches_normalised_by(real.float() / 127.5 - 1, 0)
        net = rotation_net(data[order[1000:]], seed, 300)
        real_features = quality.features(net, real)
        run = {m: [] for m in measures}
        for epoch in range(opt.niter):
            path = os.path.join(opt.work, f"{opt.variant}-seed{seed}", f"netG_epoch_{epoch}.pth")
            netG = dcgan.load_generator(path)[0]
            fake, fake_2000 = samples(netG, 1000, opt.batchSize), samples(netG, 2000, 256)
            for name, (bench_net, bench_real) in zip(("benchmark", "benchmark, net 1"), benchmarks):
                fake_features = quality.features(bench_net, fake_2000)
                run[name].append(quality.frechet(bench_real, fake_features))
            run["score"].append(dcgan.sliced_wasserstein(real_patches,
                                                         patches_normalised_by(fake, 1)[0]))
            run["score, real statistics"].append(
                dcgan.sliced_wasserstein(real_patches, patches_normalised_by(fake, 1, stats)[0]))
            run["rotation net"].append(quality.frechet(real_features, quality.features(net, fake)))
        runs.append(run)
        for name in measures:
            print(f"seed {seed} {name:24s} {' '.join(f'{v:.1f}' for v in run[name])}", flush=True)
    for name in measures[1:]:
        rho, no_worse, ratio = [], 0, []
        for run in runs:
            bench, picked = run["benchmark"], min(range(opt.niter), key=run[name].__getitem__)
            rho.append(quality.spearman(bench, run[name]))
            no_worse += bench[picked] <= bench[-1]
            ratio.append(bench[picked] / min(bench))
        print(f"{name:24s} median Spearman {statistics.median(rho):.2f}; no worse than the last G "
              f"on {no_worse} of {len(runs)}; median best / run's best "
              f"{statistics.median(ratio):.2f} ({' '.join(f'{r:.2f}' for r in ratio)})")


if __name__ == "__main__":
    main()

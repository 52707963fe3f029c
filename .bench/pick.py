"""Which epoch would dcgan.py's score keep? Scores every epoch's netG_epoch_N.pth of the runs that
`quality.py --per-epoch --variant NAME:...` trained, offline, with dcgan.py's own score functions
(so runs trained before the score changed are judged by today's score), beside the benchmark, and
prints per seed and over the seeds: the rank correlation with the benchmark, whether the score's
pick is no worse than the last G, and the pick's benchmark against the run's best.

  python .bench/pick.py --work /tmp/q32 --variant fp32 --seeds 1,2,3,4,5 --imageSize 32 --niter 10

Measures: the benchmark; dcgan.py's score as a run with the defaults computes it (its rotation
network taught on the first 4,000 of the run's shuffled images, seeded by the run's seed, its
features of the first 1,000 against 1,000 samples of the fixed score noise); the same G against
the next 1,000 real images (the score's noise: "other real" below, and the relative gap in %); the
benchmark with its feature network seeded 1 (how well the benchmark reproduces itself).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from quality import dcgan  # noqa: E402


@torch.no_grad()
def samples(netG, n, batch_size):
    """n images of netG from dcgan.py's score noise (seed 0), BatchNorm in batch mode."""
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
    for seed in (0, 1):
        net = quality.train_features(held_out[2000:], seed=seed)[0]
        benchmarks.append((net, quality.features(net, held_out[:2000])))
    args = dcgan.parse_args(["--dataset", "folder", "--dataroot", folder, "--imageSize",
                             str(opt.imageSize), "--cache-dir", os.path.join(opt.work, "cache")])
    dataset = dcgan.open_dataset(args)
    data = dcgan.preloaded(args, dataset, dcgan.data_keys(args, dataset)[1], torch.device("cpu"),
                           lambda *a, **k: None)
    measures = ["benchmark", "score", "other real", "benchmark, net 1"]
    runs = []
    for seed in map(int, opt.seeds.split(",")):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        real = data[order[:4000]].float() / 127.5 - 1  # what dcgan.py's score learns on
        net = dcgan.train_rotation_net(dcgan.at_32(real), seed)
        real_features = dcgan.features(net, real[:1000])
        other_features = dcgan.features(net, data[order[4000:5000]].float() / 127.5 - 1)
        run = {m: [] for m in measures}
        for epoch in range(opt.niter):
            path = os.path.join(opt.work, f"{opt.variant}-seed{seed}", f"netG_epoch_{epoch}.pth")
            netG = dcgan.load_generator(path)[0]
            fake, fake_2000 = samples(netG, 1000, opt.batchSize), samples(netG, 2000, 256)
            for name, (bench_net, bench_real) in zip(("benchmark", "benchmark, net 1"), benchmarks):
                fake_features = quality.features(bench_net, fake_2000)
                run[name].append(quality.frechet(bench_real, fake_features))
            fake_features = dcgan.features(net, fake)
            run["score"].append(dcgan.frechet_distance(real_features, fake_features))
            run["other real"].append(dcgan.frechet_distance(other_features, fake_features))
        runs.append(run)
        for name in measures:
            print(f"seed {seed} {name:17s} {' '.join(f'{v:.1f}' for v in run[name])}", flush=True)
        gaps = [abs(o - s) / s for s, o in zip(run["score"], run["other real"])]
        print(f"seed {seed} score's noise: median gap to other real images "
              f"{100 * statistics.median(gaps):.1f}%", flush=True)
    for name in measures[1:]:
        rho, no_worse, ratio, picks = [], 0, [], []
        for run in runs:
            bench, picked = run["benchmark"], min(range(opt.niter), key=run[name].__getitem__)
            rho.append(quality.spearman(bench, run[name]))
            no_worse += bench[picked] <= bench[-1]
            ratio.append(bench[picked] / min(bench))
            picks.append(f"{bench[picked]:.1f} (epoch {picked}; last {bench[-1]:.1f})")
        print(f"{name:17s} Spearman {' '.join(f'{r:.2f}' for r in rho)}, median "
              f"{statistics.median(rho):.2f}; no worse than the last G on {no_worse} of "
              f"{len(runs)}; best / run's best {' '.join(f'{r:.2f}' for r in ratio)}, median "
              f"{statistics.median(ratio):.2f}; picks {', '.join(picks)}")


if __name__ == "__main__":
    main()

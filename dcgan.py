"""DCGAN in one file: Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", 2015 (arXiv:1511.06434).

  python dcgan.py --dataset synthetic --imageSize 16 --batchSize 64 --niter 4   # CPU, no download
  python dcgan.py --dataroot celeba --cuda --ngpu 2                             # CelebA on two GPUs
  torchrun --nproc_per_node=8 dcgan.py --dataroot celeba                        # DDP, a process a GPU
  python dcgan.py --resume --dataroot celeba --cuda                             # continue out/checkpoint.pt
  python dcgan.py --generate 1000 --netG out/checkpoint.pt --outf fid           # images, no training

The lesson comes first (G, D, their initialisation, one training iteration, sampling), then the machinery in
the order a run uses it. README has the measurements behind each default.
"""
import argparse
import contextlib
import copy
import csv
import datetime
import glob
import hashlib
import inspect
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2


# ---- The networks (paper, section 3): all-convolutional, BatchNorm, ReLU in G with Tanh at the output,
# LeakyReLU(0.2) in D, no pooling, no fully connected hidden layers. The number of blocks follows
# log2(image size); at 64x64 both equal pytorch/examples layer for layer, state-dict keys included
# (main.0.weight, ...), so its .pth files load here.
def blocks(image_size):
    """The blocks between the 4x4 stage and the image: 3 at 64x64."""
    if image_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"image_size must be a power of two from 16 to 256, got {image_size}")
    return int(math.log2(image_size)) - 3


class Generator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3, image_size=64):
        super().__init__()
        n = blocks(image_size)
        width = ngf * 2 ** n
        # (B, nz, 1, 1) -> (B, ngf*2^n, 4, 4): the paper's projection of z, as a convolution
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(n):  # (B, w, s, s) -> (B, w/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # (B, ngf, S/2, S/2) -> (B, nc, S, S), no BatchNorm on the output layer (section 3)
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    """Returns logits: the sigmoid is in the loss, stable and safe under autocast (BCE with logits)."""

    def __init__(self, nc=3, ndf=64, image_size=64):
        super().__init__()
        n = blocks(image_size)
        # (B, nc, S, S) -> (B, ndf, S/2, S/2), no BatchNorm on the input layer (section 3)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n):  # (B, w, s, s) -> (B, 2w, s/2, s/2)
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        # (B, ndf*2^n, 4, 4) -> (B, 1, 1, 1)
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x).flatten()  # (B,) logits


def weights_init(m):
    """Section 4: all weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---- One training iteration (Goodfellow et al. 2014, algorithm 1 with k = 1; paper, section 4). The
# optimizers are Adam with lr 0.0002 and beta1 0.5: the default 0.9 made training oscillate.
def train_step(netG, netD, optG, optD, real, z, real_label=1.0, dtype=None, scaler=None):
    """One update of D, then one of G, on real images in [-1, 1] (B, nc, S, S) and noise z (B, nz, 1, 1). dtype
    bf16 or fp16 runs the networks under autocast, fp16 with a GradScaler (else scaler's calls are plain ones).
    Returns Loss_D, Loss_G, D(x), D(G(z)) before and after D's update, in one tensor left on the device."""
    scaler = scaler or torch.amp.GradScaler(real.device.type, enabled=False)
    autocast = torch.autocast(real.device.type, dtype=dtype, enabled=dtype is not None)

    ############################
    # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
    ############################
    optD.zero_grad(set_to_none=True)
    with autocast:
        fake = netG(z)  # (B, nc, S, S)
        # Real and fake go through D as separate batches, so each BatchNorm sees one kind of image
        # (as in pytorch/examples). fake is detached: this update trains D alone.
        out_real, out_fake = netD(real), netD(fake.detach())  # (B,) logits each
    out_real, out_fake = out_real.float(), out_fake.float()
    # D's target for real images is 1, or less with one-sided label smoothing (Salimans et al. 2016, 3.4)
    loss_d = (F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, real_label))
              + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
    scaler.scale(loss_d).backward()
    scaler.step(optD)

    ############################
    # (2) Update G: maximize log(D(G(z))), the non-saturating loss (Goodfellow et al. 2014, section 3):
    # log(1 - D(G(z))) has vanishing gradients early on, when D rejects every fake. The same fakes go
    # through the updated D, whose own gradients are not needed here.
    ############################
    optG.zero_grad(set_to_none=True)
    netD.requires_grad_(False)
    with autocast:
        out_g = netD(fake).float()
    loss_g = F.binary_cross_entropy_with_logits(out_g, torch.ones_like(out_g))  # fake labels are real for G
    scaler.scale(loss_g).backward()
    scaler.step(optG)
    netD.requires_grad_(True)
    scaler.update()  # fp16: one scale update an iteration, after both steps

    with torch.no_grad():
        return torch.stack([loss_d, loss_g, *(torch.sigmoid(x).mean() for x in (out_real, out_fake, out_g))])


# ---- Sampling: images from z, an averaged G, walks through the latent space
@torch.no_grad()
def sample(netG, z, batch_stats=True):
    """G(z) for viewing, from a copy of G that leaves G untouched. batch_stats (the default, as measured: README):
    BatchNorm uses this batch's statistics, as in training and in pytorch/examples; else the running ones."""
    return copy.deepcopy(netG).train(batch_stats)(z)


@torch.no_grad()
def update_average(averaged, current, step, decay):
    """averaged = d * averaged + (1 - d) * current, d = min(decay, (1 + t) / (10 + t)) at step t, so that a short
    run is not pulled back to the random initial weights. t is on the device: no host sync, fine in a graph."""
    d = torch.clamp((1 + step) / (10 + step), max=decay)
    torch._foreach_mul_(averaged, d)
    torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))


def slerp(z0, z1, t):
    """Spherical interpolation (section 6.1 walks the latent space). Gaussian z of many dimensions lie near a
    sphere: the straight line between two passes through the low-norm middle that G never saw, the arc not."""
    a, b = z0.flatten(1), z1.flatten(1)
    omega = torch.arccos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)).unsqueeze(1)
    so = torch.sin(omega)
    arc = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so.clamp(min=1e-6)
    return torch.where(so > 1e-6, arc, (1 - t) * a + t * b).view_as(z0)  # (nearly) parallel: the line is the arc


def latent_walks(rows, steps, nz, generator):
    """z for `rows` walks of `steps` points, row after row, each along the arc between two random z."""
    ends = torch.randn(2, rows, nz, 1, 1, device=generator.device, generator=generator)
    t = torch.linspace(0, 1, steps, device=generator.device).repeat(rows).unsqueeze(1)
    return slerp(ends[0].repeat_interleave(steps, 0), ends[1].repeat_interleave(steps, 0), t)


# ---- The machinery. A mistake a person can act on raises Fail: main() prints its one line and exits
# with its code (README has the table).
EXIT_USAGE, EXIT_DATA, EXIT_FILE, EXIT_DEVICE, EXIT_OUTPUT, EXIT_DIVERGED = 2, 3, 4, 5, 6, 7
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class Fail(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.quiet = code, os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 alone prints


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- Data: every data set yields uint8 images (C, S, S), scaled to [-1, 1] on the device
def synthetic_faces(n, size, nc=3, seed=0):
    """Learnable face-like images, seeded: a head, two eyes and a mouth, varied in colour, size and place."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, nc, size, size, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def ellipse(x0, y0, ax, ay):  # a soft-edged mask, anti-aliased over about one pixel
        return torch.sigmoid((1 - (((xs - x0) / ax) ** 2 + ((ys - y0) / ay) ** 2)) * size / 4)
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        u = [torch.rand(m, k, 1, 1, generator=g) for k in (1, 1, 1, 1, 1, 1, 1, 3, 1, 1, 1)]  # k values an image
        cx, cy, rx = (u[0] - 0.5) * 0.4, (u[1] - 0.5) * 0.3, 0.45 + 0.2 * u[2]
        ry, eye_r = rx * (1.15 + 0.2 * u[3]), rx * (0.12 + 0.05 * u[4])
        eyes = sum(ellipse(cx + side * 0.38 * rx, cy - 0.2 * ry, eye_r, eye_r) for side in (-1, 1))
        mouth = ellipse(cx, cy + 0.5 * ry, rx * (0.25 + 0.2 * u[5]), ry * (0.06 + 0.06 * u[6]))
        head, skin = ellipse(cx, cy, rx, ry), torch.cat([0.55 + 0.4 * u[8], 0.35 + 0.35 * u[9], 0.25 + 0.3 * u[10]], 1)
        img = (u[7] * 0.8) * (1 - head) + skin * head  # u[7]: the background's colour
        img = img * (1 - eyes) + 0.08 * eyes
        img = img * (1 - mouth) + torch.tensor([0.6, 0.1, 0.15]).view(1, 3, 1, 1) * mouth
        out[start:start + m] = ((img.mean(1, keepdim=True) if nc == 1 else img).clamp(0, 1) * 255).round()
    return out


def face_crop(img):
    """CelebA's aligned 178x218 pictures cut to the face, the centre 108/178 of the width; other shapes left whole."""
    h, w = img.shape[-2:]
    return img if abs(h / w - 218 / 178) > 0.03 else v2.functional.center_crop(img, round(w * 108 / 178))


def image_transform(dataset, size):
    """CelebA's face crop, then, as in pytorch/examples, the short side resized and the centre cropped."""
    crop = [face_crop] if dataset == "celeba" else []
    return v2.Compose(crop + [v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def decode_image(path, nc):
    """uint8 (nc, H, W) from any file PIL reads (16-bit grey comes out clipped); None if it is not an image."""
    with contextlib.suppress(Exception), Image.open(path) as im:
        return v2.functional.pil_to_tensor(im.convert("L" if nc == 1 else "RGB"))
    return None


class Images(torch.utils.data.Dataset):
    """uint8 images from files or a torchvision set; an unreadable file is None or (substitute) the next readable."""

    def __init__(self, items, nc, transform, substitute=True):
        self.items, self.nc, self.transform, self.substitute = items, nc, transform, substitute

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not isinstance(self.items, list):
            return self.transform(v2.functional.pil_to_tensor(self.items[i][0].convert("L" if self.nc == 1 else "RGB")))
        for j in range(i, i + (100 if self.substitute else 1)):
            img = decode_image(self.items[j % len(self.items)], self.nc)
            if img is not None:
                return self.transform(img)
            if self.substitute:
                warn(f"skipped unreadable image {self.items[j % len(self.items)]}")
        return None


def list_images(root):
    """Every image file under root, sorted, hidden folders left out; links followed, never into a cycle."""
    paths, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        seen.add(os.path.realpath(folder))
        dirs[:] = [d for d in sorted(dirs) if d[0] != "." and os.path.realpath(os.path.join(folder, d)) not in seen]
        paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def build_dataset(opt, ranks):
    """(uint8 images, channels, cache key): the key follows the files (names, sizes, times), not its path's spelling."""
    size, kind, root, nc = opt.imageSize, opt.dataset, opt.dataroot, 1 if opt.dataset == "mnist" else 3
    if kind == "synthetic":
        return synthetic_faces(8192, size, 3, seed=opt.manualSeed), 3, None
    if kind == "fake":
        g = torch.Generator().manual_seed(opt.manualSeed)
        return torch.randint(0, 256, (1024, 3, size, size), generator=g, dtype=torch.uint8), 3, None
    if kind in ("cifar10", "mnist"):  # downloaded into --dataroot (made if missing), once a node
        items = ranks.local_first(lambda: open_torchvision(kind, root, opt.classes))
    elif not os.path.isdir(root):
        raise Fail(EXIT_DATA, f"--dataroot {root} is not a folder; give the folder that holds the {kind} images")
    elif kind == "lsun":
        items = open_torchvision(kind, root, opt.classes)
    folder = os.path.realpath(root)
    if kind in ("celeba", "folder"):
        if kind == "celeba":  # the folder that holds img_align_celeba/, that folder, or torchvision's layout
            inside = (os.path.join(root, "img_align_celeba"), os.path.join(root, "celeba", "img_align_celeba"))
            folder = os.path.realpath(next((f for f in inside if os.path.isdir(f)), root))
        items = list_images(folder)
        if not items:
            hint = " (expected ROOT/img_align_celeba/*.jpg, see README)" if kind == "celeba" else ""
            raise Fail(EXIT_DATA, f"--dataroot {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...){hint}")
    content = hashlib.sha1(f"{opt.classes} {len(items)}".encode())
    for p in items if isinstance(items, list) else ():
        content.update(f"{os.path.relpath(p, folder)} {os.stat(p).st_size} {os.stat(p).st_mtime_ns}\n".encode())
    key = f"{kind}-{size}px-{hashlib.sha1(folder.encode()).hexdigest()[:8]}-{content.hexdigest()[:16]}"
    return Images(items, nc, image_transform(kind, size)), nc, key


def open_torchvision(kind, root, classes):
    try:
        if kind == "lsun":
            return torchvision.datasets.LSUN(root=root, classes=[c + "_train" for c in classes.split(",")])
        os.makedirs(root, exist_ok=True)
        return {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}[kind](root, download=True)
    except Exception as e:
        what = "download it there (see README)" if kind == "lsun" else "check the network or download it yourself"
        raise Fail(EXIT_DATA, f"could not open {kind} in --dataroot {root}: {(str(e).splitlines() or [e])[0]}; {what}")


def load_data(opt, dataset, key, nc, device, ranks, log):
    """The data set decoded once into uint8 (N, C, S, S), memory-mapped from --cache-dir, else in memory."""
    if isinstance(dataset, torch.Tensor):
        data = dataset
    elif opt.preload is False:
        return dataset
    else:
        shape, write = (len(dataset), nc, opt.imageSize, opt.imageSize), ranks.local_rank == 0
        data = ranks.local_first(lambda: cached_decode(opt, dataset, key, shape, log, write)) if opt.cache_dir else None
        if data is None:  # decoded into memory
            data = (out := torch.empty(shape, dtype=torch.uint8))[:decode_all(dataset, opt.workers, log, out)]
    return data.to(device) if device.type == "cuda" and data.nbytes < torch.cuda.mem_get_info(device)[0] // 2 else data


def cached_decode(opt, dataset, key, shape, log, write):
    """--cache-dir/KEY.u8 memory-mapped, decoded there first if `write` (local rank 0); None if it cannot be."""
    item, path = math.prod(shape[1:]), os.path.join(opt.cache_dir, f"{key}.u8")
    if os.path.isfile(path):
        log(f"data set: {os.path.getsize(path) // item} images, memory-mapped from cache {path}")
        return mapped(path, shape)
    if not write:
        return None
    instead = f"decoding into memory ({math.prod(shape) / 2**30:.1f} GiB) instead; --no-preload decodes every epoch"
    try:
        with replacing(path, instead) as tmp:
            os.makedirs(opt.cache_dir, exist_ok=True)
            with open(tmp, "wb+") as f:  # take the room now: a disk that fills under a mapped file kills the process
                reserve = getattr(os, "posix_fallocate", None) or (lambda fd, _, size: os.ftruncate(fd, size))
                reserve(f.fileno(), 0, shape[0] * item)
                f.truncate(decode_all(dataset, opt.workers, log, mapped(tmp, shape, shared=True)) * item)
                os.fsync(f.fileno())
    except Fail as e:
        if e.code != EXIT_OUTPUT:
            raise
        warn(str(e))  # no room, no permission: go on without the cache
        return None
    for old in set(glob.glob(os.path.join(glob.escape(opt.cache_dir), key.rsplit("-", 1)[0] + "-*.u8"))) - {path}:
        remove(old)  # an older decode of the same folder at the same size
    log(f"cached the decoded data set in {path}, memory-mapped from there")
    return mapped(path, shape)


def mapped(path, shape, shared=False):
    return torch.from_file(path, shared=shared, size=os.path.getsize(path), dtype=torch.uint8).view(-1, *shape[1:])


def decode_all(dataset, workers, log, out):
    """The data set into out (N, C, S, S); returns the count. Unreadable files are named; over 1% stop the run."""
    dataset = Images(dataset.items, dataset.nc, dataset.transform, substitute=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=stack_readable)
    bad, done, good, last = [], 0, 0, time.monotonic()
    for chunk, unreadable in loader:
        chunk = out[:0] if chunk is None else chunk  # (a batch of nothing but unreadable files)
        out[good:good + len(chunk)] = chunk
        bad += [dataset.items[done + i] for i in unreadable]
        good, done = good + len(chunk), done + len(chunk) + len(unreadable)
        if time.monotonic() - last > 5 or done == len(dataset):
            log(f"decoding the data set once: {done}/{len(dataset)} images ({100 * done // len(dataset)}%)")
            last = time.monotonic()
    if bad:
        warn(f"skipped {len(bad)} unreadable image(s): {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''}")
    if len(bad) > max(1, len(dataset) // 100) or not good:
        raise Fail(EXIT_DATA, f"{len(bad)} of {len(dataset)} images in --dataroot could not be read "
                              f"(first: {bad[0]}); remove or replace them")
    return good


def stack_readable(items):
    """The readable images in one tensor (one block of shared memory a batch), and where the others were."""
    good = [x for x in items if x is not None]
    return torch.stack(good) if good else None, [i for i, x in enumerate(items) if x is None]


def uint8_batches(data, order, batch_size, workers=0, pin_memory=False):
    """data[order] in batches of uint8 images: slices of a decoded tensor, or decoded by `workers` processes."""
    if isinstance(data, torch.Tensor):
        yield from (data[order[i:i + batch_size]] for i in range(0, len(order), batch_size))
        return
    for batch, unreadable in torch.utils.data.DataLoader(data, batch_size, sampler=order, num_workers=workers,
                                                         collate_fn=stack_readable, pin_memory=pin_memory):
        if unreadable:  # a worker met 100 in a row; raised here, since a worker's exception comes back as a traceback
            raise Fail(EXIT_DATA, "100 unreadable images in a row in --dataroot (named above); check the data set")
        yield batch


def epoch_batches(data, batch_size, seed, epoch, start=0, rank=0, world=1, workers=0, device=torch.device("cpu"),
                  memory_format=torch.contiguous_format):
    """This rank's share of an epoch from batch `start` on, float images in [-1, 1] on the device, in an order
    from (seed, epoch) alone, so that a resumed run sees the same; full batches only, for BatchNorm."""
    sampler = torch.utils.data.DistributedSampler(range(len(data)), world, rank, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[start * batch_size:len(sampler) // batch_size * batch_size]
    for batch in uint8_batches(data, order, batch_size, workers, pin_memory=device.type == "cuda"):
        # [0, 255] -> [-1, 1], the range of G's Tanh (section 3)
        yield batch.to(device, non_blocking=True).float().div_(127.5).sub_(1).contiguous(memory_format=memory_format)


# ---- Files. Each is written to a temporary file beside it and renamed into place: a crash leaves the
# old file or the new one, whole. Rank 0 alone writes into --outf.
def remove(path):
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@contextlib.contextmanager
def replacing(path, hint="free disk space or fix the permissions of its folder (the previous file there is intact)"):
    """Yields a temporary name beside path, renamed over it after the block. A failure removes the temporary; the
    disk's (full, quota, permissions, also inside torch.save, which wraps it) is one line, any other passes."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{socket.gethostname()}.tmp")  # nodes may share a cache folder
    try:
        yield tmp
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename made durable; Windows cannot open a folder, nor needs to
            fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except BaseException as e:
        remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise Fail(EXIT_OUTPUT, f"could not write {path}: {cause.strerror or cause}; {hint}") from None


def atomic_write(path, write):
    """write(f) into a temporary file, flushed, fsynced and renamed over path."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_grid(images, path, nrow=8):
    atomic_write(path, lambda f: torchvision.utils.save_image(images, f, "png", nrow=nrow, normalize=True,
                                                              value_range=(-1, 1)))


def prepare_outf(outf):
    with contextlib.suppress(OSError):
        os.makedirs(outf, exist_ok=True)
    if not (os.path.isdir(outf) and os.access(outf, os.W_OK)):  # said now, not after the data is loaded
        raise Fail(EXIT_OUTPUT, f"--outf {outf} cannot be written (not a folder, or read-only); choose another --outf")


def write_png_folder(folder, batches):
    """Each uint8 image as folder/NNNNNN.png, in a temporary folder renamed when full; returns 64 for a grid."""
    prepare_outf(os.path.dirname(folder))
    if os.path.isdir(folder) and os.listdir(folder):
        raise Fail(EXIT_OUTPUT, f"{folder} already holds files; choose another --outf")
    grid = []
    with replacing(folder, "free disk space or choose another --outf") as tmp:
        os.makedirs(tmp)
        for i, img in enumerate(img for batch in batches for img in batch):  # (C, S, S)
            Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).save(os.path.join(tmp, f"{i:06d}.png"))
            grid += [img] if i < 64 else []
        if hasattr(os, "sync"):
            os.sync()  # every PNG on disk with one call, rather than one fsync a file
    return torch.stack(grid).float() / 127.5 - 1


def all_finite(obj):
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return all(all_finite(x) for x in items)


def load_file(path, what):
    """torch.load with the safe loader (a file that would run code is refused unread), after the CRC32 of each
    zip record, since torch.load takes flipped bytes in a tensor without a word. inf or NaN is damage too."""
    if not os.path.isfile(path):
        raise Fail(EXIT_FILE, f"{what} {path} does not exist")
    record = obj = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                record = archive.testzip()
        with warnings.catch_warnings():  # a crafted file makes the loader warn; one line is enough
            warnings.simplefilter("ignore")
            obj = None if record else torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise Fail(EXIT_FILE, f"{what} {path} cannot be loaded: it is empty, truncated, damaged, not a PyTorch file, "
                              "or holds Python objects beyond tensors (refused unread)") from None
    if record or not all_finite(obj):
        why = f"its part {record} fails its checksum" if record else "it holds inf or NaN, which dcgan.py never saves"
        raise Fail(EXIT_FILE, f"{what} {path} is damaged: {why}; use an earlier copy")
    return obj


def load_weights(net, path, what, obj=None, key=None):
    """A weights file (also the PyTorch example's, or a wrapped module's), or part `key` of a checkpoint."""
    obj = load_file(path, what) if obj is None else obj
    state = obj[key or what[2:]] if isinstance(obj, dict) and "format" in obj else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Fail(EXIT_FILE, f"{what} {path} is not a state dict of tensors")
    for prefix in ("_orig_mod.", "module.", "_orig_mod."):  # compile of DDP, DDP of compile
        nn.modules.utils.consume_prefix_in_state_dict_if_present(state, prefix)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:] or [""])[0].strip()[:200]  # torch's first mismatch
        raise Fail(EXIT_FILE, f"{what} {path} does not fit the model built from the flags ({detail}); "
                              "check --nz --ngf --ndf --imageSize and the data set") from None


def load_generator(opt):
    """The G of --netG, its shape read from the file; of a checkpoint its averaged G when it has one."""
    obj = load_file(opt.netG, "--netG")
    key = "netG_ema" if isinstance(obj, dict) and "netG_ema" in obj else "netG"
    state = obj.get(key, obj) if isinstance(obj, dict) else {}
    try:
        convs = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 4]
        netG = Generator(convs[0].shape[0], convs[-1].shape[0], convs[-1].shape[1], 2 ** (len(convs) + 1))
    except (AttributeError, IndexError, ValueError):
        raise Fail(EXIT_FILE, f"--netG {opt.netG} is not a generator state dict") from None
    load_weights(netG, opt.netG, "--netG", obj, key)
    return netG.eval()


# What a resumed run must share with the run that wrote its checkpoint
ARCHITECTURE = ("nz", "ngf", "ndf", "nc", "imageSize", "batchSize", "manualSeed")
LOG_FIELDS = ["epoch", "iter", "step", "loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "img_per_s", "warning"]


def read_checkpoint(path, config):
    ckpt = load_file(path, "--resume checkpoint")
    needed = {"format", "netG", "netD", "optG", "optD", "epoch", "iter", "step", "fixed_noise", "config", "history"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise Fail(EXIT_FILE, f"--resume {path} is not a checkpoint written by dcgan.py (give OUTF/checkpoint.pt)")
    if ckpt["format"] != 1:
        raise Fail(EXIT_FILE, f"--resume {path} has checkpoint format {ckpt['format']}; this dcgan.py reads 1")
    saved = ckpt["config"]
    diff = [f"{k} {saved.get(k)} saved vs {config[k]} requested" for k in ARCHITECTURE if saved.get(k) != config[k]]
    if diff:
        raise Fail(EXIT_FILE, f"--resume {path} was made with other settings: {'; '.join(diff)}; "
                              "pass the saved values or start a new --outf")
    if saved.get("world", 1) != config["world"]:
        raise Fail(EXIT_FILE, f"--resume {path} was written by {saved.get('world', 1)} process(es), this run "
                              f"has {config['world']}: resume with as many (the shards and the noise depend on it)")
    return ckpt


def write_rows(path, rows, mode="a"):
    """Rows of losses.csv, floats to 6 digits; mode "w" starts it again (from a checkpoint's history on resume)."""
    try:
        with open(path, mode, newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([f"{v:.6g}" if isinstance(v, float) else v for v in row]
                                                         for row in rows)
    except OSError as e:
        raise Fail(EXIT_OUTPUT, f"could not write {path}: {e.strerror}; free disk space or fix its folder") from None


# ---- Devices and processes: one process, or one a device under torchrun
def pick_device(opt, local_rank=0, world=1):
    """--device, --cuda or --accel, else the current accelerator, else the CPU; under torchrun LOCAL_RANK's."""
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    flag = f"--device {opt.device}" if opt.device else "--cuda" if opt.cuda else "--accel"
    if opt.accel and accel is None:  # as in pytorch/examples: no accelerator is not an error, the CPU runs it
        warn("--accel was given but no accelerator is present; running on the CPU")
    try:
        device = torch.device(opt.device or ("cuda" if opt.cuda else accel.type if accel else "cpu"))
    except RuntimeError:
        raise Fail(EXIT_DEVICE, f"{flag} is not a device: use cpu, cuda, cuda:1, mps or xpu") from None
    if world > 1 and (device.index is not None or opt.ngpu > 1):
        raise Fail(EXIT_USAGE, f"{flag if device.index is not None else '--ngpu'}: under torchrun each process takes "
                               f"the device of its LOCAL_RANK; use --device {device.type} and --nproc_per_node")
    if opt.ngpu > 1 and device.type != "cuda":
        raise Fail(EXIT_DEVICE, f"--ngpu {opt.ngpu} is for CUDA GPUs, and the device is {device.type}")
    if device.type == "cpu":
        return device
    if accel is None or accel.type != device.type:
        raise Fail(EXIT_DEVICE, f"{flag}: this torch sees no {device.type} device; drop {flag.split()[0]} for the CPU")
    index, count = local_rank if device.index is None else device.index, torch.accelerator.device_count()
    if index + opt.ngpu > count:
        raise Fail(EXIT_DEVICE, f"{flag}{f' --ngpu {opt.ngpu}' if opt.ngpu > 1 else ''}: needs {device.type} device "
                                f"{index + opt.ngpu - 1}, but {count} are present")
    torch.accelerator.set_device_index(index)
    return torch.device(device.type, index)


class Ranks:
    """This process under torchrun, and the collectives besides DDP's, on a CPU gloo group: none waits for a GPU."""

    def __init__(self, world=1):
        self.rank, self.world, self.local_rank, self.group = 0, world, 0, None
        if world > 1:
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
            # The control group: gloo on the CPU, with time for one node to decode CelebA while the others wait
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
        self.main = self.rank == 0

    def gather(self, obj):
        out = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def run(self, fn, *args):
        """fn(*args) on every rank, then agree: a Fail on any rank ends every rank with it, none left waiting."""
        try:
            result, error = fn(*args), None
        except Fail as e:
            if self.world == 1:
                raise
            result, error = None, (e.code, str(e))
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise Fail(*errors[0])
        return result

    def on_main(self, fn, *args):
        """fn(*args) on rank 0, which alone writes files; every rank learns if it failed."""
        return self.run(fn if self.main else lambda *a: None, *args)

    def local_first(self, fn):
        """fn() on each node's local rank 0 (a download, a decode), then on the others, which find it on disk."""
        first = self.run(fn if self.local_rank == 0 else lambda: None)
        later = self.run(fn if self.local_rank != 0 else lambda: None)
        return first if self.local_rank == 0 else later

    def max(self, values):
        """The element-wise max of a few integers over the ranks: a blocking all-reduce on the CPU."""
        t = torch.tensor(values)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()


class Signals:
    """SIGINT and SIGTERM (how clusters pre-empt jobs): the first is noted, and the loop saves and exits. A second
    ends the process at once, even in a collective: the C-level handler writes it to a socket a thread reads."""

    def __enter__(self):
        self.first, self.kinds = 0, (signal.SIGINT, signal.SIGTERM)
        self.handlers = {s: signal.signal(s, lambda *args: None) for s in self.kinds}
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.wakeup = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self.watch, daemon=True).start()
        return self

    def watch(self):
        with self.reader:
            while data := self.reader.recv(64):  # b"" once the writer is closed: the run is over
                for signum in (s for s in data if s in self.kinds):
                    if self.first:
                        os.write(2, f"dcgan.py: signal {signum} again: stopped at once, without saving\n".encode())
                        os._exit(128 + signum)
                    self.first = signum

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.wakeup)
        for s, h in self.handlers.items():
            signal.signal(s, h)
        self.writer.close()


# ---- Speed: precision, memory format, compile, CUDA graphs, and the networks wrapped for several
# devices. None of it changes what a step computes, only how fast.
def speed_settings(opt, device, world):
    """(dtype, memory format, cuda_graph): every speed decision in one place; the defaults are measured (README)."""
    if opt.amp == "fp16" and device.type != "cuda":
        raise Fail(EXIT_USAGE, "--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off")
    # auto is fp32 (TF32 convolutions on CUDA): bf16 learned worse
    dtype = {"auto": None, "off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opt.amp]
    channels_last = opt.channels_last
    if channels_last is None:  # (compiled channels-last convolution backward failed on torch 2.11)
        channels_last = device.type in ("cuda", "cpu") and not opt.compile
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # One CUDA graph a step needs one CUDA GPU in one process, and no fp16: its scaler reads its inf check
    cuda_graph = opt.cuda_graphs is not False and device.type == "cuda" and opt.amp != "fp16" and world == opt.ngpu == 1
    torch.backends.cudnn.benchmark = True  # every batch has the same shape: let cuDNN time its kernels once
    return dtype, memory_format, cuda_graph


def wrap(net, opt, device, world):
    """What runs net: DDP under torchrun, DataParallel with --ngpu, torch.compile on top; the plain net is saved."""
    if world > 1:
        # No buffer sync in forward: D runs on the real and the fake batch before one backward, and a sync between
        # them changes BatchNorm's buffers in place under autograd (the DDP + BatchNorm error). Training uses batch
        # statistics; the older flag also skips the sync at construction, where every rank has the same buffers.
        ddp = nn.parallel.DistributedDataParallel
        flag = next(f for f in ("forward_sync_buffers", "broadcast_buffers") if f in inspect.signature(ddp).parameters)
        net = ddp(net, device_ids=[device.index] if device.type == "cuda" else None, **{flag: False})
    elif opt.ngpu > 1:
        net = nn.DataParallel(net, list(range(device.index, device.index + opt.ngpu)))
    return torch.compile(net) if opt.compile else net


# ---- The run: set up, resume, then the loop (a step, maybe a log line, maybe a save, maybe a stop)
class Run:
    """One training run on one process. Rank 0 alone writes files; all ranks take every other decision together."""

    def __init__(self, opt, device, ranks):
        """Everything that may find a mistake in the flags, files or data, on every rank before any collective."""
        self.opt, self.device, self.ranks = opt, device, ranks
        self.log = print if ranks.main else (lambda *a, **k: None)
        self.dtype, self.memory_format, self.cuda_graph = speed_settings(opt, device, ranks.world)
        self.ckpt_path = os.path.join(opt.outf, "checkpoint.pt")
        self.resume_path = (opt.resume or self.ckpt_path) if opt.resume is not None else None
        if ranks.main and self.resume_path is None and os.path.exists(self.ckpt_path):
            what = "a --dry-run would overwrite its epoch-0 files" if opt.dry_run else "pass --resume to continue it"
            raise Fail(EXIT_OUTPUT, f"--outf {opt.outf} already holds a run; {what}, or choose another --outf")
        if ranks.main:
            prepare_outf(opt.outf)
        self.dataset, self.nc, self.key = build_dataset(opt, ranks)
        self.config = dict(vars(opt), nc=self.nc, world=ranks.world)
        self.ckpt = read_checkpoint(self.resume_path, self.config) if self.resume_path is not None else None
        torch.manual_seed(opt.manualSeed)
        self.netG = Generator(opt.nz, opt.ngf, self.nc, opt.imageSize)
        self.netD = Discriminator(self.nc, opt.ndf, opt.imageSize)
        for net, path, what in ((self.netG, opt.netG, "--netG"), (self.netD, opt.netD, "--netD")):
            net.apply(weights_init)
            if path:
                load_weights(net, path, what)
        self.fixed_noise = torch.randn(64, opt.nz, 1, 1)
        self.noise_gen = torch.Generator(device).manual_seed(opt.manualSeed + ranks.rank)  # each rank its own noise
        self.history = {k: [] for k in LOG_FIELDS}
        self.epoch = self.it = self.step = 0
        self.last_good, self.d_wins_since, self.warned = None, None, set()

    def load_data(self):
        opt, world = self.opt, self.ranks.world
        self.data = load_data(opt, self.dataset, self.key, self.nc, self.device, self.ranks, self.log)
        self.per_epoch = len(self.data) // (opt.batchSize * world)
        if self.per_epoch == 0:
            raise Fail(EXIT_DATA, f"the data set has {len(self.data)} images, fewer than one batch of --batchSize "
                                  f"{opt.batchSize}{f' x {world} processes' if world > 1 else ''}; lower --batchSize")

    def start(self):
        """The networks on the device (DDP wraps them here), the optimizers, a resumed run's state."""
        opt, device = self.opt, self.device
        self.g, self.d = (wrap(net.to(device, memory_format=self.memory_format), opt, device, self.ranks.world)
                          for net in (self.netG, self.netD))
        # Adam as in section 4; fused: one kernel for all tensors; capturable: it runs inside the CUDA graph
        adam = dict(betas=(opt.beta1, 0.999), fused=device.type in ("cuda", "cpu"), capturable=self.cuda_graph)
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=opt.lr_g or opt.lr, **adam)
        self.optD = torch.optim.Adam(self.netD.parameters(), lr=opt.lr_d or opt.lr, **adam)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.netG_ema = copy.deepcopy(self.netG).requires_grad_(False).eval() if opt.ema else None
        if self.ckpt is not None:
            self.resume(self.ckpt)
            self.ckpt = None  # free it
        if self.netG_ema is not None:  # the tensors the average reads and writes, fixed for the run
            self.ema_pairs = [[x for x in net.state_dict().values() if x.is_floating_point()]
                              for net in (self.netG_ema, self.netG)]
        self.fixed_noise = self.fixed_noise.to(device)
        self.sums = torch.zeros(5, device=device)  # the sums of train_step's values since the last log line
        self.step_t = torch.tensor(self.step, device=device)  # the step on the device, for the average's warm-up
        self.graph, self.warmup = None, 0

    def resume(self, ckpt):
        """Networks, optimizers, the averaged G, the scaler, this rank's RNG states and the position."""
        for net, optimizer, name in ((self.netG, self.optG, "G"), (self.netD, self.optD, "D")):
            net.load_state_dict(ckpt["net" + name])
            optimizer.load_state_dict(ckpt["opt" + name])
            for group in optimizer.param_groups:  # this run's --lr and device, not the saved ones
                group.update({k: optimizer.defaults[k] for k in ("lr", "fused", "capturable")})
        if self.netG_ema is not None:  # (a run that starts averaging on resume starts from G)
            self.netG_ema.load_state_dict(ckpt.get("netG_ema", self.netG.state_dict()))
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt.get("rng_ranks", [ckpt["rng"]])[self.ranks.rank]  # this rank's own states
        torch.set_rng_state(rng["torch"])
        self.noise_gen.set_state(rng["noise"])
        self.fixed_noise, self.history = ckpt["fixed_noise"], ckpt["history"]
        self.history.setdefault("warning", [""] * len(self.history["step"]))  # (checkpoints before the column)
        self.epoch, self.it, self.step = ckpt["epoch"], ckpt["iter"], ckpt["step"]
        self.last_good = self.resume_path
        self.log(f"resumed from {self.resume_path} at epoch {self.epoch}, iteration {self.it} (step {self.step})")

    def checkpoint(self):
        """Everything a run needs to go on exactly, every rank's RNG states included: each rank draws its own noise."""
        every_rank = self.ranks.gather({"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()})
        ckpt = {"format": 1, "netG": self.netG.state_dict(), "netD": self.netD.state_dict(),
                "optG": self.optG.state_dict(), "optD": self.optD.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "iter": self.it, "step": self.step, "fixed_noise": self.fixed_noise.cpu(),
                "config": self.config, "rng": every_rank[0], "rng_ranks": every_rank, "history": self.history}
        return ckpt if self.netG_ema is None else {**ckpt, "netG_ema": self.netG_ema.state_dict()}

    def train_one(self, real):
        """One iteration, eager or replayed as one CUDA graph (captured after three on a side stream): at batch
        128 a step is hundreds of small kernels, and launching them from Python costs more than running them."""
        z = torch.randn(real.shape[0], self.opt.nz, 1, 1, device=self.device, generator=self.noise_gen)
        if self.graph is not None:  # replay the captured step on new inputs
            self.static_real.copy_(real)
            self.static_z.copy_(z)
            self.graph.replay()
        elif not self.cuda_graph:
            self.iteration(real, z)
        elif self.warmup < 3:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.iteration(real, z)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warmup += 1
        else:  # capture once; capturing does not run the step, so replay it at once
            self.static_real, self.static_z, self.graph = real.clone(), z.clone(), torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may use CUDA while this one captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.iteration(self.static_real, self.static_z)
            self.graph.replay()

    def iteration(self, real, z):
        """train_step and what follows it on the device, all inside the graph when there is one."""
        self.sums += train_step(self.g, self.d, self.optG, self.optD, real, z, self.opt.real_label, self.dtype,
                                self.scaler)
        if self.netG_ema is not None:
            update_average(*self.ema_pairs, self.step_t, self.opt.ema)
        self.step_t += 1

    def loop(self):
        opt, ranks, total = self.opt, self.ranks, 1 if self.opt.dry_run else self.opt.niter * self.per_epoch
        if self.step >= total:
            self.log(f"the run in {opt.outf} is finished ({self.epoch} epochs, {self.step} iterations); to train "
                     f"longer, --resume with a --niter above {self.epoch}")
            return 0
        total = min(total, self.step + opt.max_steps) if opt.max_steps else total
        self.begin()
        with Signals() as signals:
            while self.step < total:
                first, began = self.it, time.monotonic()
                for real in epoch_batches(self.data, opt.batchSize, opt.manualSeed, self.epoch, self.it, ranks.rank,
                                          ranks.world, opt.workers, self.device, self.memory_format):
                    self.train_one(real)
                    self.step, self.it = self.step + 1, self.it + 1
                    if self.it % opt.log_every == 0 or self.it == self.per_epoch or self.step == total:
                        self.log_progress(total)
                    late = bool(opt.save_minutes) and time.monotonic() - self.last_save > 60 * opt.save_minutes
                    signum, save_now = ranks.max([signals.first, int(late)])  # every rank decides alike
                    if signum or save_now or (opt.save_every and self.step % opt.save_every == 0):
                        self.save()
                    if signum:
                        self.log(f"stopped by signal {signum} at epoch {self.epoch}, iteration {self.it}; continue "
                                 f"with --resume (checkpoint {self.ckpt_path})", flush=True)
                        return 128 + signum
                    if self.step == total:
                        break
                if self.it == self.per_epoch and not opt.dry_run:
                    self.log(f"epoch {self.epoch} done: {self.it - first} iterations, {time.monotonic() - began:.1f} s")
                    self.epoch, self.it = self.epoch + 1, 0
                    self.save(finished=self.epoch - 1)
        if opt.dry_run:
            self.save(finished=0)
        elif self.it:  # mid-epoch
            self.save()
            self.log(f"stopped after {self.step - self.first_step} iterations (--max-steps); {self.ckpt_path} saved")
            return 0
        self.log(f"done: {self.step} iterations; samples, weights{'' if opt.dry_run else ', checkpoint'} in {opt.outf}")
        return 0

    def begin(self):
        """The first files (real_samples.png; losses.csv, on resume cut back to the checkpoint), log lines, clocks."""
        opt, data, world = self.opt, self.data, self.ranks.world
        real = next(epoch_batches(data, min(64, len(data) // world), opt.manualSeed, 0))
        self.real_spread = real.std(0).mean().item()  # the data's per-pixel spread, for the collapse warning
        if self.resume_path is None:
            self.ranks.on_main(save_grid, real, os.path.join(opt.outf, "real_samples.png"))
        rows = [LOG_FIELDS, *zip(*(self.history[k] for k in LOG_FIELDS))]
        self.ranks.on_main(write_rows, os.path.join(opt.outf, "losses.csv"), rows, "w")
        kept = "decoded once" if isinstance(data, torch.Tensor) else f"decoded each epoch by {opt.workers} workers"
        size = f"{self.nc}x{opt.imageSize}x{opt.imageSize}"
        self.log(f"{opt.dataset}: {len(data)} images of {size}, {kept}; {self.device}, "
                 f"{world} process(es), global batch {opt.batchSize * world}, {opt.amp if self.dtype else 'fp32'}, "
                 f"{self.memory_format}, compile {opt.compile}, CUDA graph {self.cuda_graph}")
        self.last_save = self.tick = time.monotonic()
        self.tick_step = self.first_step = self.step

    def log_progress(self, total):
        """The log line (means since the last one: the one host sync), losses.csv, the stop on inf or NaN."""
        opt, world, per_epoch = self.opt, self.ranks.world, self.per_epoch
        values = (self.sums / (self.step - self.tick_step)).tolist()
        self.sums.zero_()
        if self.ranks.max([int(not all(map(math.isfinite, values)))])[0]:  # every rank stops alike
            raise self.diverged(f"a non-finite loss or D output in iterations {self.tick_step + 1} to {self.step}")
        loss_d, loss_g, d_x, d_g_z1, d_g_z2 = values
        rate = (self.step - self.tick_step) * opt.batchSize * world / max(time.monotonic() - self.tick, 1e-9)
        self.tick, self.tick_step = time.monotonic(), self.step
        left = [datetime.timedelta(seconds=round(n * opt.batchSize * world / rate))
                for n in (per_epoch - self.it, total - self.step)]
        self.log(f"[{self.epoch}/{opt.niter}][{self.it}/{per_epoch}] Loss_D: {loss_d:.4f} Loss_G: {loss_g:.4f} "
                 f"D(x): {d_x:.4f} D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f} | {rate:.0f} img/s | "
                 f"left: epoch {left[0]} run {left[1]}", flush=True)
        warning = self.watch_for_collapse(d_g_z1, loss_g) if self.ranks.main else ""
        row = (self.epoch, self.it, self.step, loss_d, loss_g, d_x, d_g_z1, d_g_z2, rate, warning)
        for k, v in zip(LOG_FIELDS, row):
            self.history[k].append(v)
        self.ranks.on_main(write_rows, os.path.join(opt.outf, "losses.csv"), [row])

    def diverged(self, what):
        return Fail(EXIT_DIVERGED, f"training diverged: {what} (epoch {self.epoch}); nothing after it was saved; "
                                   f"last good checkpoint: {self.last_good or 'none yet'}; try a lower --lr")

    def watch_for_collapse(self, d_g_z, loss_g, stretch=200):
        """Two failures with finite losses, said once and named in losses.csv: D wins outright (D(G(z)) < 0.01 for
        `stretch` iterations: G's gradient vanishes), or the fixed noise's samples stop varying (mode collapse)."""
        self.d_wins_since = (self.d_wins_since or self.step) if d_g_z < 0.01 else None
        kinds = {}
        if self.d_wins_since is not None and self.step - self.d_wins_since >= stretch:
            kinds["d_wins"] = (f"D has rejected nearly every fake for {self.step - self.d_wins_since} iterations "
                               f"(D(G(z)) {d_g_z:.4f}, Loss_G {loss_g:.2f}): G has stopped learning")
        if self.step >= 200:
            images = sample(self.netG_ema or self.netG, self.fixed_noise, self.opt.sample_bn == "batch")
            if (spread := images.float().std(0).mean().item()) < 0.1 * self.real_spread:
                kinds["collapsed"] = (f"the samples from the fixed noise have stopped varying (per-pixel spread "
                                      f"{spread:.3f}, the data's {self.real_spread:.3f}): mode collapse")
        for kind in [k for k in kinds if k not in self.warned]:
            self.warned.add(kind)
            warn(f"iteration {self.step} (epoch {self.epoch}): {kinds[kind]}; try a lower --lr, another --manualSeed, "
                 "or --resume from an earlier checkpoint copy")
        return "+".join(kinds)

    def save(self, finished=None):
        """checkpoint.pt, and when an epoch has finished its files, written by rank 0; all ranks take part."""
        self.ranks.on_main(self.write_files, self.checkpoint(), finished)
        self.last_good = None if self.opt.dry_run else self.ckpt_path
        self.last_save = time.monotonic()

    def write_files(self, ckpt, finished):
        """An epoch's sample grid, weights and loss plot, then the checkpoint; nothing if the state is not finite."""
        opt = self.opt
        if not all_finite(ckpt):
            raise self.diverged(f"non-finite weights or optimizer state at step {self.step}")
        if finished is not None:
            save_grid(sample(self.netG_ema or self.netG, self.fixed_noise, opt.sample_bn == "batch").float(),
                      os.path.join(opt.outf, f"fake_samples_epoch_{finished:03d}.png"))
            for name, net in (("netG", self.netG), ("netG_ema", self.netG_ema), ("netD", self.netD)):
                if net is not None:
                    atomic_write(os.path.join(opt.outf, f"{name}_epoch_{finished}.pth"),
                                 lambda f: torch.save(net.state_dict(), f))
            with contextlib.suppress(ImportError):  # losses.png, when matplotlib is installed (it is optional)
                from matplotlib.figure import Figure  # no pyplot: no window, no backend to choose
                ax = Figure(figsize=(10, 5)).subplots()
                for key, name in (("loss_g", "G"), ("loss_d", "D")):
                    ax.plot(self.history["step"], self.history[key], label=name)
                ax.set(xlabel="iteration", ylabel="loss", title="Generator and discriminator loss")
                ax.legend()
                atomic_write(os.path.join(opt.outf, "losses.png"), lambda f: ax.figure.savefig(f, format="png"))
        if not opt.dry_run:
            atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))


# ---- The command line: the flags, the commands that make images without training, main
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise Fail(EXIT_USAGE, f"{message} (see --help)")


def checked(kind, ok, allowed):
    """An argparse type: a number of `kind` for which ok(value) holds; else the error says what is allowed."""
    def convert(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"{text} is not {allowed}")
        return value
    convert.__name__ = kind.__name__  # argparse's message for what is no number at all: "invalid int value"
    return convert


COUNT, POSITIVE = checked(int, lambda v: v >= 0, "0 or more"), checked(int, lambda v: v >= 1, "1 or more")
RATE, LABEL = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number"), \
    checked(float, lambda v: 0.5 < v <= 1, "in (0.5, 1]")
FRACTION, MINUTES = checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), checked(float, lambda v: v >= 0, "0 or more")


def build_parser():
    p = Parser(description="Train a DCGAN, or make images.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # The flags of pytorch/examples dcgan/main.py, same names and meanings, so that its command lines work here
    a("--dataset", default="celeba", choices=["celeba", "folder", "imagenet", "lfw", "cifar10", "mnist", "lsun",
                                              "fake", "synthetic"], help="imagenet and lfw are folder data sets")
    a("--dataroot", help="path to the data set (not needed for fake and synthetic)")
    a("--workers", type=COUNT, default=2, help="data loading worker processes")
    a("--batchSize", type=POSITIVE, default=128, help="batch size a process")
    a("--imageSize", type=int, default=64, choices=[16, 32, 64, 128, 256], help="height and width")
    a("--nz", type=POSITIVE, default=100, help="size of the latent z vector")
    a("--ngf", type=POSITIVE, default=64, help="generator width")
    a("--ndf", type=POSITIVE, default=64, help="discriminator width")
    a("--niter", type=POSITIVE, default=25, help="number of epochs to train for")
    a("--lr", type=RATE, default=0.0002, help="Adam learning rate")
    a("--beta1", type=FRACTION, default=0.5, help="Adam beta1")
    a("--dry-run", action="store_true", help="run a single training iteration, then save and exit")
    a("--ngpu", type=POSITIVE, default=1, help="number of GPUs to use through nn.DataParallel")
    a("--netG", default="", help="generator weights to start from (or to --generate with)")
    a("--netD", default="", help="discriminator weights to start from")
    a("--outf", default="out", help="folder for samples, weights, checkpoint and logs")
    a("--manualSeed", type=COUNT, default=999, help="seed for weights, data order and noise")
    a("--classes", default="bedroom", help="comma-separated LSUN classes")
    a("--accel", action="store_true", help="use the current accelerator (torch.accelerator)")
    a("--cuda", action="store_true", help="use CUDA")
    a("--device", default="", help="device to use, e.g. cpu, cuda, cuda:1, mps, xpu (default: best present)")  # ours
    a("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="mixed precision; auto is fp32")
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile G and D")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, help="each step as one CUDA graph (default: one GPU)")
    a("--channels-last", action=argparse.BooleanOptionalAction, help="(default: CUDA and CPU, not with --compile)")
    a("--preload", action=argparse.BooleanOptionalAction, help="decode the data set once (default: on)")
    a("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dcgan"),
      help="where decoded data sets are kept, '' for none")
    a("--lr-d", type=RATE, help="D's Adam learning rate, if not --lr")
    a("--lr-g", type=RATE, help="G's Adam learning rate, if not --lr")
    a("--real-label", type=LABEL, default=1.0, help="D's target for real images; 0.9 is one-sided label smoothing")
    a("--ema", type=FRACTION, default=0.0, metavar="DECAY", help="also keep a moving average of G, e.g. 0.999")
    a("--sample-bn", default="batch", choices=["batch", "eval"], help="BatchNorm statistics when sampling")
    a("--log-every", type=POSITIVE, default=50, help="log every N iterations")
    a("--save-every", type=COUNT, default=0, help="also save the checkpoint every N iterations (0: off)")
    a("--save-minutes", type=MINUTES, default=10.0, help="also save the checkpoint every N minutes (0: off)")
    a("--max-steps", type=COUNT, default=0, help="stop (and save) after N iterations in this run (0: no limit)")
    a("--resume", nargs="?", const="", metavar="PATH", help="continue from a checkpoint (default: OUTF/checkpoint.pt)")
    a("--generate", type=COUNT, default=0, metavar="N", help="write N images from --netG into OUTF/generated/ and exit")
    a("--interpolate", type=COUNT, default=0, metavar="N", help="write N latent walks of --netG and exit")
    a("--export-real", type=COUNT, default=0, metavar="N", help="write N training images as G sees them and exit")
    return p


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    if (opt.generate or opt.interpolate) and not opt.netG:
        raise Fail(EXIT_USAGE, "--generate and --interpolate need --netG PATH (weights or a checkpoint)")
    if opt.dry_run and opt.resume is not None:
        raise Fail(EXIT_USAGE, "--dry-run writes no checkpoint and cannot --resume one; drop one of them")
    opt.dataset = "folder" if opt.dataset in ("imagenet", "lfw") else opt.dataset
    if opt.dataroot is None and opt.dataset not in ("fake", "synthetic") and not (opt.generate or opt.interpolate):
        raise Fail(EXIT_USAGE, f"--dataroot is required for --dataset {opt.dataset} (--dataset synthetic needs none)")
    return opt


def generated(netG, n, batch_stats, generator):
    """n uint8 images of G, drawn in full batches of 256, so that each sees a full batch's statistics."""
    for start in range(0, n, 256):
        z = torch.randn(256, netG.main[0].in_channels, 1, 1, device=generator.device, generator=generator)
        yield sample(netG, z, batch_stats)[:n - start].float().cpu().add(1).mul(127.5).add(0.5).clamp(0, 255).byte()


def make_images(opt, device):
    """--generate: N PNGs (what FID tools read) and a grid. --interpolate: N rows of 10 images, G along the arc
    between two random z. --export-real: N training images as the networks see them, the real side of an FID."""
    if opt.export_real:
        dataset, _, _ = build_dataset(opt, Ranks())
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(opt.manualSeed))
        folder = os.path.join(opt.outf, "real")
        write_png_folder(folder, uint8_batches(dataset, order[:opt.export_real].tolist(), 256, opt.workers))
        print(f"wrote {min(opt.export_real, len(dataset))} training images to {folder}/")
        return
    netG, g = load_generator(opt).to(device), torch.Generator(device).manual_seed(opt.manualSeed)
    if opt.interpolate:
        path = os.path.join(opt.outf, "interpolation.png")
        prepare_outf(opt.outf)
        walks = latent_walks(opt.interpolate, 10, netG.main[0].in_channels, g)  # (N * 10, nz, 1, 1)
        save_grid(sample(netG, walks, opt.sample_bn == "batch").float().cpu(), path, nrow=10)
        print(f"wrote {opt.interpolate} latent walks of 10 steps to {path}")
    else:
        folder, path = os.path.join(opt.outf, "generated"), os.path.join(opt.outf, "generated_grid.png")
        save_grid(write_png_folder(folder, generated(netG, opt.generate, opt.sample_bn == "batch", g)), path)
        print(f"wrote {opt.generate} images to {folder}/ and a grid to {path}")


def main(argv=None):
    """Runs the command line, returns the exit code; a mistake in the input is one line on stderr (README's table)."""
    try:
        opt = parse_args(argv)  # (every rank sees the same mistake in the flags)
        ranks = Ranks(int(os.environ.get("WORLD_SIZE", 1)))
        try:
            device = ranks.run(pick_device, opt, ranks.local_rank, ranks.world)
            if opt.generate or opt.interpolate or opt.export_real:  # one process does these
                if ranks.main:
                    make_images(opt, device)
                return 0
            # Set up (a mistake on any rank ends every rank with one line), load the data, start or resume, loop
            run = ranks.run(Run, opt, device, ranks)
            ranks.run(run.load_data)
            run.start()
            return run.loop()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except Fail as e:
        if not e.quiet:
            print(f"dcgan.py: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("dcgan.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""DCGAN in one file: Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", 2015 (arXiv:1511.06434).

  python dcgan.py --dataset synthetic --imageSize 16 --niter 4   # CPU, no download
  python dcgan.py --dataroot celeba --cuda --ngpu 2              # CelebA on two GPUs
  torchrun --nproc_per_node=8 dcgan.py --dataroot celeba         # DDP, a process a GPU
  python dcgan.py --resume --dataroot celeba --cuda              # continue out/checkpoint.pt
  python dcgan.py --generate 1000 --netG out/checkpoint.pt       # images, no training

The lesson comes first (G, D, their initialisation, one training iteration, sampling), then the
machinery in the order a run uses it. README has the measurements behind each default.
"""
# The lesson needs these four
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# and the machinery these
import argparse
import contextlib
import copy
import csv
import datetime
import hashlib
import inspect
import os
import shutil
import signal
import socket
import sys
import time
import warnings
import zipfile

import numpy
import torch.distributed as dist
import torchvision
from PIL import Image
from torchvision.transforms import v2

try:
    import fcntl  # the decode's lock; Windows has none
except ImportError:
    fcntl = None


# ---- The networks (paper, section 3): all-convolutional, BatchNorm, ReLU in G with Tanh at the
# output, LeakyReLU(0.2) in D, no pooling, no fully connected hidden layers. The number of blocks
# follows log2(image size); at 64x64 both equal pytorch/examples layer for layer, state-dict keys
# included (main.0.weight, ...), so its .pth files load here.
def n_blocks(image_size):
    """How many blocks lie between the 4x4 stage and the image: 3 at 64x64."""
    if image_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"image_size must be a power of two from 16 to 256, got {image_size}")
    return int(math.log2(image_size)) - 3


class Generator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3, image_size=64):
        super().__init__()
        n = n_blocks(image_size)
        width = ngf * 2 ** n
        # (B, nz, 1, 1) -> (B, ngf*2^n, 4, 4): the paper's projection of z, as a convolution
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(width), nn.ReLU(True)]
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
    """Returns logits: the sigmoid is in the loss, stable and safe under autocast."""

    def __init__(self, ndf=64, nc=3, image_size=64):
        super().__init__()
        n = n_blocks(image_size)
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


# ---- One training iteration (Goodfellow et al. 2014, algorithm 1 with k = 1; paper, section 4).
# The optimizers are Adam with lr 0.0002 and beta1 0.5: the default 0.9 made training oscillate.
def train_step(netG, netD, optG, optD, real, z, amp_dtype=None, scaler=None):
    """One update of D, then one of G, on real images in [-1, 1] (B, nc, S, S) and noise z (B, nz,
    1, 1); amp_dtype bf16 or fp16: under autocast, fp16 with a GradScaler. Returns Loss_D, Loss_G,
    D(x), D(G(z)) before and after D's update, in one tensor left on the device."""
    scaler = scaler or torch.amp.GradScaler(real.device.type, enabled=False)
    autocast = torch.autocast(real.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

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
    loss_d = (F.binary_cross_entropy_with_logits(out_real, torch.ones_like(out_real))
              + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
    scaler.scale(loss_d).backward()
    scaler.step(optD)

    ############################
    # (2) Update G: maximize log(D(G(z))), the non-saturating loss (Goodfellow et al. 2014,
    # section 3): log(1 - D(G(z))) has vanishing gradients early on, when D rejects every fake.
    # The same fakes go through the updated D, whose own gradients are not needed here.
    ############################
    optG.zero_grad(set_to_none=True)
    netD.requires_grad_(False)
    with autocast:
        out_g = netD(fake).float()
    loss_g = F.binary_cross_entropy_with_logits(out_g, torch.ones_like(out_g))  # labels: "real"
    scaler.scale(loss_g).backward()
    scaler.step(optG)
    netD.requires_grad_(True)
    scaler.update()  # fp16: one scale update an iteration, after both steps

    with torch.no_grad():
        d_outputs = [torch.sigmoid(x).mean() for x in (out_real, out_fake, out_g)]
        return torch.stack([loss_d, loss_g, *d_outputs])


# ---- Sampling: images from z, an averaged G, walks through the latent space
@torch.no_grad()
def sample(netG, z, batch_stats=True):
    """G(z) for viewing, from a copy of G that leaves G untouched. batch_stats (the default, as
    measured: README): BatchNorm uses this batch's statistics, as in training; else the running."""
    return copy.deepcopy(netG).train(batch_stats)(z)


@torch.no_grad()
def update_average(averaged, current, step, decay):
    """averaged = d * averaged + (1 - d) * current, d = min(decay, (1 + t) / (10 + t)) at step t,
    so that a short run is not pulled back to the random initial weights. t is a tensor on the
    device: no host sync, fine inside a CUDA graph."""
    d = torch.clamp((1 + step) / (10 + step), max=decay)
    torch._foreach_mul_(averaged, d)
    torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))


def slerp(z0, z1, t):
    """Spherical interpolation (section 6.1 walks the latent space). Gaussian z of many dimensions
    lie near a sphere: the straight line between two passes through the low-norm middle that G
    never saw, the arc does not."""
    a, b = z0.flatten(1), z1.flatten(1)
    cosine = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)
    omega = torch.arccos(cosine).unsqueeze(1)
    sin_omega = torch.sin(omega)
    arc = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin_omega.clamp(min=1e-6)
    line = (1 - t) * a + t * b  # for (nearly) parallel ends, where the line is the arc
    return torch.where(sin_omega > 1e-6, arc, line).view_as(z0)


def latent_walks(rows, steps, nz, rng):
    """z for `rows` walks of `steps` points, each along the arc between two random z."""
    ends = torch.randn(2, rows, nz, 1, 1, device=rng.device, generator=rng)
    t = torch.linspace(0, 1, steps, device=rng.device).repeat(rows).unsqueeze(1)
    return slerp(ends[0].repeat_interleave(steps, 0), ends[1].repeat_interleave(steps, 0), t)


# ---- The machinery. A mistake a person can act on raises Fail: main() prints its one line and
# exits with its code (README has the table).
EXIT_USAGE, EXIT_DATA, EXIT_FILE, EXIT_DEVICE, EXIT_OUTPUT, EXIT_DIVERGED = 2, 3, 4, 5, 6, 7


class Fail(Exception):
    def __init__(self, code, message, every_rank=True):
        super().__init__(message)
        self.code = code
        # under torchrun rank 0 alone prints what every rank finds; a rank alone, its own
        self.quiet = every_rank and os.environ.get("RANK", "0") != "0"


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def do_nothing(*args, **kwargs):
    return None


# ---- Data: every data set yields uint8 images (C, S, S), scaled to [-1, 1] on the device
def synthetic_faces(n, size, nc=3, seed=0):
    """Learnable face-like images, seeded: a head, eyes and a mouth, in varied colours, places."""
    rng = torch.Generator().manual_seed(seed)
    out = torch.empty(n, nc, size, size, dtype=torch.uint8)
    xs = torch.linspace(-1, 1, size)  # (S,): x along a row; ys (S, 1): y down a column
    ys = xs.view(-1, 1)

    def ellipse(x0, y0, ax, ay):  # a soft-edged mask, anti-aliased over about one pixel
        return torch.sigmoid((1 - (((xs - x0) / ax) ** 2 + ((ys - y0) / ay) ** 2)) * size / 4)
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        # uniform draws, k values an image each
        u = [torch.rand(m, k, 1, 1, generator=rng) for k in (1, 1, 1, 1, 1, 1, 1, 3, 1, 1, 1)]
        cx, cy, rx = (u[0] - 0.5) * 0.4, (u[1] - 0.5) * 0.3, 0.45 + 0.2 * u[2]
        ry, eye_r = rx * (1.15 + 0.2 * u[3]), rx * (0.12 + 0.05 * u[4])
        eyes = sum(ellipse(cx + side * 0.38 * rx, cy - 0.2 * ry, eye_r, eye_r) for side in (-1, 1))
        mouth = ellipse(cx, cy + 0.5 * ry, rx * (0.25 + 0.2 * u[5]), ry * (0.06 + 0.06 * u[6]))
        head = ellipse(cx, cy, rx, ry)
        skin = torch.cat([0.55 + 0.4 * u[8], 0.35 + 0.35 * u[9], 0.25 + 0.3 * u[10]], 1)
        img = (u[7] * 0.8) * (1 - head) + skin * head  # u[7]: the background's colour
        img = img * (1 - eyes) + 0.08 * eyes
        img = img * (1 - mouth) + torch.tensor([0.6, 0.1, 0.15]).view(1, 3, 1, 1) * mouth
        if nc == 1:
            img = img.mean(1, keepdim=True)
        out[start:start + m] = (img.clamp(0, 1) * 255).round()
    return out


def face_crop(img):
    """CelebA's aligned 178x218 pictures cut to the face, the centre 108/178 of the width."""
    h, w = img.shape[-2:]
    if abs(h / w - 218 / 178) > 0.03:  # another shape: left whole
        return img
    return v2.functional.center_crop(img, round(w * 108 / 178))


def image_transform(dataset, size):
    """CelebA's face crop, then the short side resized and the centre cropped (pytorch/examples)."""
    crop = [face_crop] if dataset == "celeba" else []
    return v2.Compose(crop + [v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def decode_image(path, nc):
    """uint8 (nc, H, W) from any file PIL reads; None if it is not an image."""
    with contextlib.suppress(Exception), Image.open(path) as im:
        if im.mode.startswith("I"):  # 16-bit grey: 0..65535 scaled to 0..255
            im = Image.fromarray(numpy.clip(numpy.asarray(im) // 257, 0, 255).astype(numpy.uint8))
        return v2.functional.pil_to_tensor(im.convert("L" if nc == 1 else "RGB"))
    return None


class Images(torch.utils.data.Dataset):
    """(uint8 image (nc, S, S), its file's path) from the files under root; None for the image of a
    file that cannot be read."""

    def __init__(self, root, paths, nc, transform):
        self.root, self.paths, self.nc, self.transform = root, paths, nc, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = decode_image(self.paths[i], self.nc)
        return None if img is None else self.transform(img), self.paths[i]


def list_images(root):
    """Every image file under root (the extensions that torchvision's ImageFolder reads), sorted,
    without hidden folders; links followed, not cycles."""
    paths, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        seen.add(os.path.realpath(folder))
        dirs[:] = [d for d in sorted(dirs)
                   if d[0] != "." and os.path.realpath(os.path.join(folder, d)) not in seen]
        paths += [os.path.join(folder, f) for f in sorted(files)
                  if f.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)]
    return paths


def open_dataset(opt):
    """--dataset's uint8 images: a tensor (N, C, S, S), or a Dataset (torchvision's downloaded)."""
    kind, root, size = opt.dataset, opt.dataroot, opt.imageSize
    if kind == "synthetic":
        return synthetic_faces(8192, size, seed=opt.manualSeed)
    if kind == "fake":
        rng = torch.Generator().manual_seed(opt.manualSeed)
        return torch.randint(0, 256, (1024, 3, size, size), generator=rng, dtype=torch.uint8)
    if kind in ("cifar10", "mnist", "lsun"):
        return open_torchvision(opt)
    if not os.path.isdir(root):
        raise Fail(EXIT_DATA, f"--dataroot {root} is not a folder; give the one with the images")
    folder = os.path.realpath(root)
    if kind == "celeba":  # the folder that holds img_align_celeba/, that folder, or torchvision's
        inside = [os.path.join(folder, "img_align_celeba"),
                  os.path.join(folder, "celeba", "img_align_celeba")]
        folder = next((f for f in inside if os.path.isdir(f)), folder)
    paths = list_images(folder)
    if not paths:
        expected = "ROOT/img_align_celeba/*.jpg" if kind == "celeba" else "*.jpg, *.png, ..."
        raise Fail(EXIT_DATA, f"--dataroot {root} holds no images (expected {expected})")
    return Images(folder, paths, opt.nc, image_transform(kind, size))


def open_torchvision(opt):
    """CIFAR-10 or MNIST, downloaded into --dataroot, or LSUN: (uint8 image, label) pairs."""
    kind, root = opt.dataset, opt.dataroot
    transform = v2.Compose([v2.PILToTensor(), image_transform(kind, opt.imageSize)])
    try:
        if kind == "lsun":
            classes = [c + "_train" for c in opt.classes.split(",")]
            return torchvision.datasets.LSUN(root, classes, transform=transform)
        os.makedirs(root, exist_ok=True)
        kinds = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}
        return kinds[kind](root, download=True, transform=transform)
    except Exception as e:
        todo = "check the network or download it yourself (README)"
        if kind == "lsun":
            todo = "download it there (README)"
        raise Fail(EXIT_DATA, f"could not open {kind} in --dataroot {root}: "
                              f"{(str(e).splitlines() or [e])[0]}; {todo}") from None


DECODE_VERSION = 3  # part of the cache's name: raise it when what a decode makes of a file changes


def data_keys(opt, dataset):
    """(what a resumed run must find again, the images and their order: the data set, the image
    size, the count, the files' names and sizes under their folder; the cache's name, which also
    follows the folder, the files' times and the decode's version). One os.stat a file."""
    same_images = f"{opt.dataset}-{opt.imageSize}px-{len(dataset)}"
    if isinstance(dataset, torch.Tensor):
        return same_images, None
    classes = opt.classes if opt.dataset == "lsun" else ""
    names = hashlib.sha1(classes.encode())
    times = hashlib.sha1(f"{DECODE_VERSION} {names.hexdigest()}".encode())
    for path in getattr(dataset, "paths", ()):
        try:
            stat = os.stat(path)
        except OSError:  # a dangling link
            raise Fail(EXIT_DATA, f"{path} cannot be read; remove or replace unreadable files") \
                from None
        name = os.path.relpath(path, dataset.root)
        names.update(os.fsencode(f"{name} {stat.st_size}\n"))  # (names need not be UTF-8)
        times.update(os.fsencode(f"{name} {stat.st_mtime_ns}\n"))
    where = os.fsencode(os.path.realpath(opt.dataroot) + classes)  # (LSUN: one cache a class set)
    folder = hashlib.sha1(where).hexdigest()[:8]
    same_images += f"-{names.hexdigest()[:12]}"
    return same_images, f"{opt.dataset}-{opt.imageSize}px-{folder}-{times.hexdigest()[:12]}"


def preloaded(opt, dataset, cache_name, device, log):
    """The data set as one uint8 tensor (N, C, S, S): memory-mapped from --cache-dir, else decoded
    into memory; on a GPU, moved there if it fits in half its free memory. With --no-preload, the
    Dataset itself, decoded every epoch."""
    data = dataset
    if not isinstance(dataset, torch.Tensor):
        if not opt.preload:
            return dataset
        data = decoded(opt, dataset, cache_name, log)
    if device.type == "cuda" and data.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        data = data.to(device)
    return data


def decoded(opt, dataset, cache_name, log):
    """The Dataset decoded into one tensor: through the cache, else into memory."""
    shape = (len(dataset), opt.nc, opt.imageSize, opt.imageSize)
    if opt.cache_dir:
        try:
            with disk_errors(opt.cache_dir, "decoding into memory instead"):
                path = os.path.join(opt.cache_dir, f"{cache_name}.npy")
                return cached(dataset, path, shape, opt.workers, log)
        except Fail as e:
            if e.code != EXIT_OUTPUT:  # (a data error stops the run)
                raise
            warn(str(e))  # no room, no permission: go on without the cache
    out = torch.empty(shape, dtype=torch.uint8)
    decode_all(dataset, opt.workers, log, out)
    return out


def cached(dataset, path, shape, workers, log):
    """The cache at path memory-mapped, decoded there first. One process a host decodes, under a
    lock that ends with its process; the others wait and map its file."""
    data = mapped(path, shape)
    if data is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        folder, name = os.path.split(path)
        lock = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
        try:  # (a file never renamed nor removed, which every user of the cache can open)
            wait_for_lock(lock, f"waiting for another process's decode into {path}", log)
            data = mapped(path, shape)  # (that process's file)
            if data is None:
                if os.path.exists(path):
                    warn(f"the cache {path} is damaged or does not match the data set: decoding "
                         "it again")
                decode_into(path, dataset, shape, workers, log)
                log(f"cached the decoded data set in {path}, memory-mapped from there")
                return mapped(path, shape)
        finally:
            os.close(lock)  # (the lock ends with it)
    log(f"data set: {len(data)} images, memory-mapped from cache {path}")
    return data


def wait_for_lock(fd, waiting, log):
    """The lock on the open file fd, saying `waiting` if another process holds it; none where
    there are no locks (Windows, NFS without them: the temporaries are a host's own anyway)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(waiting, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (OSError, AttributeError):  # (AttributeError: no fcntl)
        pass


def decode_into(path, dataset, shape, workers, log):
    """The data set decoded straight into a new .npy file at path, through a temporary renamed
    when whole; earlier decodes of the same folder at the same size, and their temporaries, go."""
    folder, name = os.path.split(path)
    with replacing(path) as tmp:
        out = numpy.lib.format.open_memmap(tmp, "w+", numpy.uint8, shape)
        if hasattr(os, "posix_fallocate"):  # the room taken now: a disk that fills under a mapped
            with open(tmp, "r+b") as f:      # file kills the process
                os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
        decode_all(dataset, workers, log, torch.from_numpy(out))
        out.flush()
        del out
    stem, this_host = name.rsplit("-", 1)[0], f".{socket.gethostname()}.tmp"
    for older in os.listdir(folder):  # earlier decodes of this folder at this size, and this
        # host's temporaries of them (other hosts may be decoding theirs; locks are kept)
        stale = older.startswith(stem) or older.startswith("." + stem) and older.endswith(this_host)
        if stale and not older.lstrip(".").startswith(name):
            remove(os.path.join(folder, older))


def mapped(path, shape):
    """The .npy file memory-mapped (copy-on-write: nothing is written back), or None if it is
    missing or does not hold these images (truncated, say)."""
    try:
        images = numpy.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    return torch.from_numpy(images) if images.shape == shape else None


def decode_all(dataset, workers, log, out):
    """The data set's images into out (N, C, S, S)."""
    done, last_log = 0, time.monotonic()
    for images in uint8_batches(dataset, range(len(dataset)), 256, workers):
        out[done:done + len(images)] = images
        done += len(images)
        if time.monotonic() - last_log > 5 or done == len(dataset):
            log(f"decoding the data set once: {done}/{len(dataset)} images")
            last_log = time.monotonic()


def readable_batch(items):
    """(image, path or label) pairs as (the images stacked, []), or as (None, the paths of the
    files that cannot be read) if there are any."""
    unreadable = [path for img, path in items if img is None]
    if unreadable:
        return None, unreadable
    return torch.stack([img for img, _ in items]), []


def ignore_signals(worker_id):
    """In a training run's data worker: Ctrl-C and SIGTERM reach the whole process group, and are
    the main process's to act on (it saves, then ends the workers). Other workers end on them."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def uint8_batches(data, order, batch_size, workers=0, pin_memory=False, worker_init_fn=None):
    """data[order] in batches: slices of a decoded tensor, or decoded by `workers` processes; a
    file that cannot be read stops the run, named."""
    if isinstance(data, torch.Tensor):
        order = torch.tensor(order, device=data.device)  # one copy an epoch, not one a step
        yield from (data[order[i:i + batch_size]] for i in range(0, len(order), batch_size))
        return
    loader = torch.utils.data.DataLoader(data, batch_size, sampler=order, num_workers=workers,
                                         collate_fn=readable_batch, pin_memory=pin_memory,
                                         worker_init_fn=worker_init_fn)
    for images, unreadable in loader:
        if images is None:
            what = unreadable[0]
            if len(unreadable) > 1:
                what += f" (and {len(unreadable) - 1} more in its batch)"
            raise Fail(EXIT_DATA, f"{what} cannot be read; remove or replace unreadable files",
                       every_rank=False)
        yield images


def epoch_batches(data, opt, ranks, epoch, start, device, memory_format):
    """This rank's batches of an epoch from batch `start` on, in [-1, 1] on the device, in an order
    from (seed, epoch) alone, as a resumed run sees it; full batches only, for BatchNorm."""
    sampler = torch.utils.data.DistributedSampler(range(len(data)), ranks.world, ranks.rank,
                                                  seed=opt.manualSeed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[start * opt.batchSize:len(sampler) // opt.batchSize * opt.batchSize]
    for batch in uint8_batches(data, order, opt.batchSize, opt.workers, device.type == "cuda",
                               worker_init_fn=ignore_signals):
        batch = batch.to(device, non_blocking=True).float()
        # [0, 255] -> [-1, 1], the range of G's Tanh (section 3)
        yield batch.div_(127.5).sub_(1).contiguous(memory_format=memory_format)


# ---- Files. Each is written to a temporary beside it and renamed into place: a crash leaves the
# old file or the new one, whole. Rank 0 alone writes into --outf.
def remove(path):
    with contextlib.suppress(OSError):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def temporary_name(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{socket.gethostname()}.tmp")  # nodes may share a folder


@contextlib.contextmanager
def disk_errors(path, todo="free disk space or fix its folder's permissions"):
    """The disk's errors (full, quota, permissions; also inside torch.save, which wraps them) as one
    line naming path, exit 6; any other error passes."""
    try:
        yield
    except Fail:
        raise
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise Fail(EXIT_OUTPUT, f"could not write {path}: {cause.strerror or cause}; {todo}") \
            from None


@contextlib.contextmanager
def replacing(path, tmp=None):
    """A temporary file or folder (tmp) renamed over path after the block, made durable; a failure
    removes the temporary and leaves path as it was."""
    tmp = tmp or temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename on disk (Windows cannot open a folder)
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write(path, write):
    """write(f) into a temporary file, flushed, fsynced and renamed over path."""
    with disk_errors(path, "free disk space (the file there is intact)"), replacing(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def save_grid(images, path, nrow=8):
    def write(f):
        torchvision.utils.save_image(images, f, "png", nrow=nrow, normalize=True,
                                     value_range=(-1, 1))
    atomic_write(path, write)


def prepare_outf(outf):
    with contextlib.suppress(OSError):
        os.makedirs(outf, exist_ok=True)
    if not (os.path.isdir(outf) and os.access(outf, os.W_OK)):  # said before the data loads
        raise Fail(EXIT_OUTPUT, f"--outf {outf} cannot be written (not a folder, or read-only); "
                                "choose another --outf")


def write_png_folder(folder, batches):
    """Each uint8 image as folder/NNNNNN.png, in a temporary folder renamed when full; returns the
    first 64 in [-1, 1], for a grid."""
    prepare_outf(os.path.dirname(folder))
    if os.path.isdir(folder) and os.listdir(folder):
        raise Fail(EXIT_OUTPUT, f"{folder} already holds files; choose another --outf")
    grid = []
    with disk_errors(folder, "free disk space or choose another --outf"), replacing(folder) as tmp:
        remove(tmp)  # (left by a killed run)
        os.makedirs(tmp)
        for i, img in enumerate(img for batch in batches for img in batch):  # (C, S, S)
            pixels = img.permute(1, 2, 0).squeeze(-1).numpy()  # (S, S, C), or (S, S) if grey
            Image.fromarray(pixels).save(os.path.join(tmp, f"{i:06d}.png"))
            if i < 64:
                grid.append(img)
        if hasattr(os, "sync"):
            os.sync()  # every PNG on disk with one call, rather than one fsync a file
    return torch.stack(grid).float() / 127.5 - 1


def all_finite(obj):
    """Whether every floating-point tensor in a nested checkpoint is free of inf and NaN."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        obj = list(obj.values())
    return not isinstance(obj, (list, tuple)) or all(map(all_finite, obj))


def load_file(path, what):
    """torch.load with the safe loader (a file that would run code is refused unread), after the
    CRC32 of each zip record: torch.load takes flipped bytes in a tensor without a word."""
    if not os.path.isfile(path):
        raise Fail(EXIT_FILE, f"{what} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        with warnings.catch_warnings():  # a crafted file makes the loader warn; one line is enough
            warnings.simplefilter("ignore")
            obj = None if damaged else torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise Fail(EXIT_FILE, f"{what} {path} cannot be loaded: it is empty, truncated, damaged, "
                              "not a PyTorch file, or holds Python objects beyond tensors "
                              "(refused unread)") from None
    if damaged or not all_finite(obj):  # inf or NaN, which dcgan.py never saves, is damage too
        why = f"its part {damaged} fails its checksum" if damaged else "it holds inf or NaN"
        raise Fail(EXIT_FILE, f"{what} {path} is damaged: {why}; use an earlier copy")
    return obj


def load_weights(net, path, what, key):
    """Weights into net: a state dict (also the PyTorch example's, or a wrapped module's), or the
    part `key` of a checkpoint."""
    state = load_file(path, what)
    if isinstance(state, dict) and "format" in state:
        state = state.get(key)
    if not (isinstance(state, dict) and state and
            all(isinstance(v, torch.Tensor) for v in state.values())):
        raise Fail(EXIT_FILE, f"{what} {path} is not a state dict of tensors")
    for _ in range(2):  # DataParallel's or DDP's prefix, torch.compile's, one over the other
        for prefix in ("module.", "_orig_mod."):
            nn.modules.utils.consume_prefix_in_state_dict_if_present(state, prefix)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        mismatch = (str(e).splitlines()[1:] or [""])[0].strip()[:200]  # torch's first
        raise Fail(EXIT_FILE, f"{what} {path} does not fit the model built from the flags "
                              f"({mismatch}); check --nz --ngf --ndf --imageSize, the data") \
            from None


def load_generator(path):
    """(the G in path, its nz), its shape read from the file; of a checkpoint, the averaged G when
    it has one."""
    obj = load_file(path, "--netG")
    key = "netG_ema" if isinstance(obj, dict) and "netG_ema" in obj else "netG"
    state = obj.get(key, obj) if isinstance(obj, dict) else {}
    convs = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 4]
    try:
        nz, ngf, nc = convs[0].shape[0], convs[-1].shape[0], convs[-1].shape[1]
        netG = Generator(nz, ngf, nc, 2 ** (len(convs) + 1))
    except (IndexError, ValueError):
        raise Fail(EXIT_FILE, f"--netG {path} is not a generator state dict") from None
    load_weights(netG, path, "--netG", key)
    return netG.eval(), nz


# What a resumed run must share with the run that wrote its checkpoint: the networks' shapes, the
# batches and their order, the noise (whose generator differs between device types), the
# precision (--amp auto is bf16 on some machines only), the score
MUST_MATCH = ("nz", "ngf", "ndf", "nc", "imageSize", "batchSize", "manualSeed", "processes",
              "device", "precision", "data", "score_images")
LOG_FIELDS = ["epoch", "iter", "step", "loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "img_per_s",
              "warning"]
FORMAT = 4  # of checkpoint.pt


def read_checkpoint(path, config):
    ckpt = load_file(path, "--resume checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise Fail(EXIT_FILE, f"--resume {path} is not a checkpoint of this dcgan.py (format "
                              f"{FORMAT}; earlier ones cannot be resumed); start a new --outf")
    saved = ckpt["config"]
    differ = [f"{k} {saved[k]} saved vs {config[k]} now"
              for k in MUST_MATCH if saved[k] != config[k]]
    if differ:
        raise Fail(EXIT_FILE, f"--resume {path} cannot go on exactly: {'; '.join(differ)}; resume "
                              "with its flags, data, device type and processes, or a new --outf")
    return ckpt


def load_optimizer(optimizer, saved):
    """Adam's saved state with this run's --lr, --beta1 and device settings, its moments in the
    memory layout of their parameters: fused Adam walks both as flat memory, and a checkpoint of
    an earlier dcgan.py may hold them in another."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group.update({k: optimizer.defaults[k] for k in ("lr", "betas", "fused", "capturable")})
    for param, state in optimizer.state.items():
        for k, v in state.items():
            if v.shape == param.shape:  # (not the step count)
                state[k] = torch.empty_like(param).copy_(v)


def write_rows(path, rows, mode="a"):
    """Rows of losses.csv, floats to 6 digits; mode "w" starts it again."""
    with disk_errors(path), open(path, mode, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


# ---- Devices and processes: one process, or one a device under torchrun
def pick_device(opt, local_rank=0, world=1):
    """--device, --cuda or --accel, else the current accelerator, else the CPU; under torchrun the
    device of LOCAL_RANK."""
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    flag = "--accel"
    if opt.device or opt.cuda:
        flag = f"--device {opt.device}" if opt.device else "--cuda"
    if opt.accel and accel is None:  # as in pytorch/examples: the CPU runs it
        warn("--accel was given but no accelerator is present; running on the CPU")
    try:
        device = torch.device(opt.device or ("cuda" if opt.cuda else getattr(accel, "type", "cpu")))
    except RuntimeError:
        raise Fail(EXIT_DEVICE, f"{flag} is not a device: use cpu, cuda, cuda:1, mps or xpu") \
            from None
    if world > 1 and (device.index is not None or opt.ngpu > 1):
        raise Fail(EXIT_USAGE, f"{flag if opt.ngpu == 1 else '--ngpu'}: under torchrun each process"
                               " takes its LOCAL_RANK's device; use --nproc_per_node")
    if opt.ngpu > 1 and device.type != "cuda":
        raise Fail(EXIT_DEVICE, f"--ngpu {opt.ngpu} is for CUDA GPUs, and the device is {device}")
    if device.type == "cpu":
        return device
    index = local_rank if device.index is None else device.index
    present = torch.accelerator.device_count() if accel and accel.type == device.type else 0
    if index + opt.ngpu > present:
        gpus = f" --ngpu {opt.ngpu}" if opt.ngpu > 1 else ""
        raise Fail(EXIT_DEVICE, f"{flag}{gpus}: needs {device.type} device {index + opt.ngpu - 1},"
                                f" and this torch sees {present}; drop the flag for the CPU")
    torch.accelerator.set_device_index(index)
    return torch.device(device.type, index)


class Ranks:
    """This process's place under torchrun, and the collectives besides DDP's, on a CPU gloo group
    (none of them waits for a GPU)."""

    def __init__(self, world=1):
        self.rank, self.local_rank, self.world, self.group = 0, 0, world, None
        if world > 1:
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
            # with time for one node to decode CelebA while the others wait
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
        self.is_main = self.rank == 0

    def gather(self, obj):
        out = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, fn, *args):
        """fn(*args) on every rank, then a Fail on any rank ends every rank with it. fn runs no
        collective itself, or the ranks could pair theirs wrongly."""
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
        return self.agree(fn if self.is_main else do_nothing, *args)

    def local_first(self, fn, *args):
        """fn(*args) on each node's local rank 0 (a download, a decode), then on the others, which
        find its work on disk."""
        first = self.agree(fn if self.local_rank == 0 else do_nothing, *args)
        later = self.agree(fn if self.local_rank != 0 else do_nothing, *args)
        return first if self.local_rank == 0 else later

    def max_over_ranks(self, values):
        """The element-wise max of a few integers over the ranks (a blocking all-reduce)."""
        values = torch.tensor(values)
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values.tolist()


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (how clusters pre-empt jobs): the first is noted, and the loop
    saves and exits after the step; repeats within a second count once (a scheduler and torchrun
    may both send it). A signal after that ends the process at once, with the default action."""

    def __enter__(self):
        self.signum = 0
        self.handlers = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def note(self, signum, frame):
        if self.signum and time.monotonic() - self.first_at > 1:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()

    def __exit__(self, *exc):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)


# ---- Speed: precision, memory format, CUDA graphs, the networks wrapped for several devices.
# Only the precision changes what a step computes (its rounding); the rest, only how fast.
PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # for the log


def native_bf16(device):
    """A CUDA GPU of compute capability 8 or more, or a CPU with AMX or AVX-512 bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported()
                                     or torch.cpu._is_avx512_bf16_supported())


def speed_settings(opt, device, world):
    """(autocast dtype or None, memory format, whether a CUDA graph runs each step): every speed
    decision in one place; the defaults are measured (README)."""
    if opt.amp == "fp16" and device.type != "cuda":
        raise Fail(EXIT_USAGE, "--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off")
    amp = opt.amp
    if amp == "auto":  # bf16 where the device computes in it natively, as measured (README)
        amp = "bf16" if opt.ngpu == 1 and native_bf16(device) else "off"
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    memory_format = torch.contiguous_format
    if device.type in ("cuda", "cpu"):
        memory_format = torch.channels_last
    # One CUDA graph a step: one CUDA GPU in one process, no fp16 (its scaler syncs with the host)
    cuda_graph = opt.cuda_graphs and device.type == "cuda" and opt.amp != "fp16" and \
        world == opt.ngpu == 1
    torch.backends.cudnn.benchmark = True  # every batch has one shape: cuDNN times its kernels once
    return amp_dtype, memory_format, cuda_graph


def wrap(net, opt, device, world):
    """What runs net: DDP under torchrun, DataParallel with --ngpu; the plain net is saved."""
    if world > 1:
        # No buffer sync in forward: D runs on the real and the fake batch before one backward,
        # and a sync between them changes BatchNorm's buffers in place under autograd. Training
        # uses batch statistics; the older flag also skips the sync at construction, where every
        # rank has the same buffers.
        ddp = nn.parallel.DistributedDataParallel
        flag = "forward_sync_buffers"
        if flag not in inspect.signature(ddp).parameters:
            flag = "broadcast_buffers"
        device_ids = [device.index] if device.type == "cuda" else None
        return ddp(net, device_ids=device_ids, **{flag: False})
    if opt.ngpu > 1:
        return nn.DataParallel(net, list(range(device.index, device.index + opt.ngpu)))
    return net


class CudaGraphed:
    """fn(real, z) as one CUDA graph, captured after three warm-up calls on a side stream, then
    replayed: at batch 128 a step is hundreds of small kernels, and launching them from Python
    costs more than running them."""

    def __init__(self, fn, device):
        self.fn, self.device, self.graph, self.warmups = fn, device, None, 0
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, real, z):
        if self.graph is not None:  # replay the captured call on new inputs
            self.static_real.copy_(real)
            self.static_z.copy_(z)
            self.graph.replay()
        elif self.warmups < 3:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                self.fn(real, z)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            self.warmups += 1
        else:  # capture once; capturing records the call without running it: replay it now
            self.static_real, self.static_z = real.clone(), z.clone()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may use CUDA while this one captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.fn(self.static_real, self.static_z)
            self.graph.replay()


# ---- Which G to keep: a DCGAN's losses do not say how good its samples are, and the samples
# often get worse late in a run. After every epoch G's samples are scored against real images by
# the Frechet distance (the formula of FID) between their features in a small network that learns,
# at the start of the run, how far the run's own images were turned (README has the measurements);
# netG_best.pth keeps the best-scoring G.
def rotation_net(nc):
    """Four strided convolutions to 256 features, then a guess at one of four quarter turns."""
    layers, width = [], nc
    for out in (32, 64, 128, 256):
        # (momentum=None: BatchNorm's running statistics average every batch, few or many)
        layers += [nn.Conv2d(width, out, 3, 2, 1), nn.BatchNorm2d(out, momentum=None), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 4))


def at_32(images):
    """Images of any size resized to 32x32, the rotation network's input."""
    return F.interpolate(images.float(), size=32, mode="bilinear", antialias=True)


def train_rotation_net(images, seed, batch_size=128):
    """rotation_net taught to tell by how many quarter turns images (in [-1, 1], 32x32) were
    turned, in as many random batches as ten passes over them (at least ten); seeded, and leaving
    the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # (the CPU's alone)
        net = rotation_net(images.shape[1]).to(images.device)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(max(10, 10 * len(images) // batch_size)):
        batch = images[torch.randint(len(images), (batch_size,), generator=rng).to(images.device)]
        turns = torch.randint(4, (batch_size,), generator=rng).to(images.device)
        turned = torch.cat([torch.rot90(batch[turns == k], k, (2, 3)) for k in range(4)])
        loss = F.cross_entropy(net(turned), turns.sort().values)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def features(net, images):
    """The rotation network's 256 features of each image, in float64 on the CPU."""
    return net[:-1](at_32(images)).double().cpu()


def frechet_distance(a, b):
    """|mean_a - mean_b|^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2) of two sets of features."""
    cov_a, cov_b = torch.cov(a.T, correction=0), torch.cov(b.T, correction=0)  # (also of one)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    gap = (a.mean(0) - b.mean(0)).square().sum()
    return (gap + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def start_scores(outf, data, indices, n, seed, scores, best_G, device):
    """The rotation network, taught on the real images data[indices], and its features of the
    first n, which the score compares with; scores.csv and netG_best.pth as the checkpoint has
    them (a resume may go back to an earlier one)."""
    write_rows(os.path.join(outf, "scores.csv"), [("epoch", "score"), *scores], "w")
    write_best_G(outf, best_G)
    real = torch.cat(list(uint8_batches(data, indices, 256))).to(device)
    real = at_32(real / 127.5 - 1)
    net = train_rotation_net(real, seed)
    return net, features(net, real[:n])


def write_best_G(outf, best_G):
    """netG_best.pth: best_G, a state dict, or no file when there is none (yet)."""
    path = os.path.join(outf, "netG_best.pth")
    if best_G is None:
        remove(path)
    else:
        atomic_write(path, lambda f: torch.save(best_G, f))


# ---- The run: set up, resume, then the loop (a step, maybe a log line, a save, a stop)
def check_outf(opt, is_main):
    """--outf may hold no other run than the one resumed (from a checkpoint there, or a copy of
    one), nor the best G of a run whose checkpoint has gone; said before the data loads."""
    if not is_main:
        return
    ckpt_path = os.path.join(opt.outf, "checkpoint.pt")
    resume_folder = os.path.dirname(opt.resume or ckpt_path)
    resumed_here = opt.resume is not None and \
        os.path.realpath(resume_folder or ".") == os.path.realpath(opt.outf)
    if os.path.exists(ckpt_path) and not resumed_here:
        todo = "a --dry-run would overwrite its files" if opt.dry_run else "--resume continues it"
        raise Fail(EXIT_OUTPUT, f"--outf {opt.outf} already holds a run; {todo}, or choose "
                                "another --outf")
    if os.path.exists(os.path.join(opt.outf, "netG_best.pth")) and not resumed_here:
        raise Fail(EXIT_OUTPUT, f"--outf {opt.outf} holds an earlier run's netG_best.pth; move it "
                                "or choose another --outf")
    prepare_outf(opt.outf)


def diverged(what, epoch, last_good):
    return Fail(EXIT_DIVERGED, f"training diverged: {what} (epoch {epoch}); nothing after it was "
                               f"saved; last good checkpoint: {last_good or 'none yet'}; try a "
                               "lower --lr")


def plot_losses(history, path):
    """losses.png, when matplotlib is installed (it is optional)."""
    with contextlib.suppress(ImportError):
        from matplotlib.figure import Figure  # no pyplot: no window, no backend to choose
        ax = Figure(figsize=(10, 5)).subplots()
        for key, name in (("loss_g", "G"), ("loss_d", "D")):
            ax.plot(history["step"], history[key], label=name)
        ax.set(xlabel="iteration", ylabel="loss", title="Generator and discriminator loss")
        ax.legend()
        atomic_write(path, lambda f: ax.figure.savefig(f, format="png"))


class Run:
    """One training run on this process: the networks, optimizers, noise and position, and what
    each step leads to. Rank 0 alone writes files; all ranks take every other decision together."""

    def __init__(self, opt, device, ranks, same_images):
        """What can find a mistake in the flags or files (the checkpoint, the weights to start
        from), on every rank, before any collective."""
        self.opt, self.device, self.ranks = opt, device, ranks
        self.log = print if ranks.is_main else do_nothing
        self.amp_dtype, self.memory_format, self.cuda_graph = speed_settings(opt, device,
                                                                             ranks.world)
        self.ckpt_path = os.path.join(opt.outf, "checkpoint.pt")
        resume_path = opt.resume or self.ckpt_path
        self.config = dict(vars(opt), processes=ranks.world, device=device.type,
                           precision=PRECISION[self.amp_dtype], data=same_images)
        self.ckpt = None if opt.resume is None else read_checkpoint(resume_path, self.config)
        self.last_good = resume_path if self.ckpt else None
        torch.manual_seed(opt.manualSeed)
        self.netG = Generator(opt.nz, opt.ngf, opt.nc, opt.imageSize)
        self.netD = Discriminator(opt.ndf, opt.nc, opt.imageSize)
        for net, path, name in ((self.netG, opt.netG, "netG"), (self.netD, opt.netD, "netD")):
            net.apply(weights_init)
            if path:  # the weights to start from: a state dict, or this part of a checkpoint
                load_weights(net, path, "--" + name, name)
        self.fixed_noise = torch.randn(64, opt.nz, 1, 1)
        # each rank draws its own noise
        self.noise_rng = torch.Generator(device).manual_seed(opt.manualSeed + ranks.rank)
        self.history = {k: [] for k in LOG_FIELDS}
        self.epoch = self.epoch_it = self.step = self.window_start = 0
        # train_step's values since step window_start (the last log line), for the next line
        self.sums = torch.zeros(5, device=device)
        self.d_wins_since, self.warned = None, set()
        self.scores = []  # [epoch, score] after each epoch
        self.best_G = None  # the state dict of the best-scoring epoch's G, on the CPU

    def start(self, data):
        """The data, the networks on the device (DDP wraps them here), the optimizers, and a
        resumed run's state."""
        opt, device, world = self.opt, self.device, self.ranks.world
        self.data, self.per_epoch = data, len(data) // (opt.batchSize * world)
        if self.per_epoch == 0:
            raise Fail(EXIT_DATA, f"the data set has {len(data)} images, fewer than one batch of "
                                  f"--batchSize {opt.batchSize} on {world} process(es)")
        for net in (self.netG, self.netD):
            net.to(device, memory_format=self.memory_format)
        self.wrappedG, self.wrappedD = (wrap(net, opt, device, world)
                                        for net in (self.netG, self.netD))
        # Adam as in section 4; fused: one kernel for all tensors; capturable: inside the graph
        adam = dict(lr=opt.lr, betas=(opt.beta1, 0.999), fused=device.type in ("cuda", "cpu"),
                    capturable=self.cuda_graph)
        self.optG = torch.optim.Adam(self.netG.parameters(), **adam)
        self.optD = torch.optim.Adam(self.netD.parameters(), **adam)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.netG_ema = None
        if opt.ema:
            self.netG_ema = copy.deepcopy(self.netG).requires_grad_(False).eval()
        # the G that the grids and the score show, and netG_best.pth keeps
        self.shown_G = self.netG if self.netG_ema is None else self.netG_ema
        if self.ckpt:
            self.resume(self.ckpt)
            self.ckpt = None  # free it
        if self.netG_ema is not None:  # the tensors that the average reads and writes
            self.ema_pairs = [[x for x in net.state_dict().values() if x.is_floating_point()]
                              for net in (self.netG_ema, self.netG)]
        self.fixed_noise = self.fixed_noise.to(device)
        self.step_t = torch.tensor(self.step, device=device)  # for the average's warm-up

    def resume(self, ckpt):
        """The networks, optimizers, averaged G, scaler, noise and position of the checkpoint."""
        for net, optimizer, name in ((self.netG, self.optG, "G"), (self.netD, self.optD, "D")):
            net.load_state_dict(ckpt["net" + name])
            load_optimizer(optimizer, ckpt["opt" + name])
        if self.netG_ema is not None:  # (a run that starts averaging on resume starts from G)
            self.netG_ema.load_state_dict(ckpt.get("netG_ema", self.netG.state_dict()))
        self.scaler.load_state_dict(ckpt["scaler"])
        self.noise_rng.set_state(ckpt["noise_rng"][self.ranks.rank])  # this rank's own noise
        self.fixed_noise, self.history = ckpt["fixed_noise"], ckpt["history"]
        self.scores, self.best_G = ckpt["scores"], ckpt["best_G"]
        self.epoch, self.epoch_it, self.step = ckpt["epoch"], ckpt["iter"], ckpt["step"]
        self.window_start, sums = ckpt["log_window"]
        self.sums = sums.to(self.device)
        self.log(f"resumed from {self.last_good} at epoch {self.epoch}, iteration {self.epoch_it} "
                 f"(step {self.step})")

    def train_one(self, real, z):
        """One iteration on the device: train_step, the average's update, the sums for the log."""
        self.sums += train_step(self.wrappedG, self.wrappedD, self.optG, self.optD, real, z,
                                self.amp_dtype, self.scaler)
        if self.netG_ema is not None:
            update_average(*self.ema_pairs, self.step_t, self.opt.ema)
        self.step_t += 1

    def loop(self):
        """Steps until --niter epochs, --max-steps or a signal; returns the exit code."""
        opt = self.opt
        total = 1 if opt.dry_run else opt.niter * self.per_epoch
        if self.step >= total:
            self.log(f"the run in {opt.outf} is finished ({self.epoch} epochs, {self.step} "
                     f"iterations); to train longer, --resume with a --niter above {self.epoch}")
            return 0
        if opt.max_steps:
            total = min(total, self.step + opt.max_steps)
        first_step = self.step
        self.write_first_files()
        iterate = self.train_one  # (a local: on self, a cycle would keep DDP past the group)
        if self.cuda_graph:
            iterate = CudaGraphed(self.train_one, self.device)
        signum = 0
        with StopSignal() as stop:
            while self.step < total and not signum:
                began = time.monotonic()
                for real in epoch_batches(self.data, opt, self.ranks, self.epoch, self.epoch_it,
                                          self.device, self.memory_format):
                    z = torch.randn(real.shape[0], opt.nz, 1, 1, device=self.device,
                                    generator=self.noise_rng)
                    iterate(real, z)
                    self.step, self.epoch_it = self.step + 1, self.epoch_it + 1
                    self.log_progress(total)
                    signum = self.save_if_due(stop)
                    if signum or self.step == total:
                        break
                if self.epoch_it == self.per_epoch:  # (else --max-steps, --dry-run or a signal)
                    self.epoch, self.epoch_it = self.epoch + 1, 0
                    scored = self.save(epoch_done=self.epoch - 1)
                    self.log(f"epoch {self.epoch - 1} done: {time.monotonic() - began:.1f} s"
                             f"{scored}")
            return self.finish(first_step, signum)

    def save_if_due(self, stop):
        """Saves on a signal, --save-every or --save-minutes, as every rank decides alike, unless
        the epoch's own save follows (a checkpoint between the two would skip the epoch's files);
        returns the signal's number, or 0."""
        opt = self.opt
        late = opt.save_minutes > 0 and time.monotonic() - self.last_save > 60 * opt.save_minutes
        signum, late = self.ranks.max_over_ranks([stop.signum, int(late)])
        due = signum or late or (opt.save_every and self.step % opt.save_every == 0)
        if due and self.epoch_it != self.per_epoch:
            self.save()
        return signum

    def finish(self, first_step, signum):
        """The run's last save and line; returns the exit code."""
        if signum:  # (saved when the loop saw it)
            self.log(f"stopped by signal {signum} at epoch {self.epoch}, iteration "
                     f"{self.epoch_it}; continue with --resume", flush=True)
            return 128 + signum
        if self.epoch_it and self.opt.dry_run:  # epoch 0's files, and no checkpoint
            self.save(epoch_done=0)
        elif self.epoch_it:
            self.save()
            self.log(f"stopped after {self.step - first_step} iterations (--max-steps); "
                     f"{self.ckpt_path} saved")
            return 0
        self.log(f"done: {self.step} iterations; samples, weights and logs in {self.opt.outf}")
        return 0

    def write_first_files(self):
        """The run's first files (real_samples.png; losses.csv, on resume as the checkpoint has
        it), its description, and the clocks."""
        opt, data, world = self.opt, self.data, self.ranks.world
        some = torch.randperm(len(data), generator=torch.Generator().manual_seed(opt.manualSeed))
        # (next() in agreement: every rank reads these, and may fail on them alike)
        real = self.ranks.agree(next, uint8_batches(data, some[:64].tolist(), 64))
        real = real.float() / 127.5 - 1
        self.real_spread = real.std(0).mean().item()  # for the collapse warning
        if self.last_good is None:
            self.ranks.on_main(save_grid, real, os.path.join(opt.outf, "real_samples.png"))
        rows = [LOG_FIELDS, *zip(*(self.history[k] for k in LOG_FIELDS))]
        self.ranks.on_main(write_rows, os.path.join(opt.outf, "losses.csv"), rows, "w")
        if opt.score_images:  # the score's real images, the same each run; rank 0 scores
            n = min(opt.score_images, len(data))
            self.scorer = self.ranks.on_main(start_scores, opt.outf, data, some[:4 * n].tolist(),
                                             n, opt.manualSeed, self.scores, self.best_G,
                                             self.device)
        kept = "decoded once"
        if not isinstance(data, torch.Tensor):
            kept = f"decoded each epoch by {opt.workers} workers"
        self.log(f"{opt.dataset}: {len(data)} images of {opt.nc}x{opt.imageSize}x{opt.imageSize},"
                 f" {kept}; {self.device}, {world} process(es), global batch "
                 f"{opt.batchSize * world}, {PRECISION[self.amp_dtype]}, "
                 f"{self.memory_format}, CUDA graph {self.cuda_graph}")
        self.last_save = self.tick = time.monotonic()
        self.tick_step = self.step

    def log_progress(self, total):
        """Every --log-every iterations and at the end of an epoch or run: the log line (means
        since the last one: the one host sync), losses.csv, and the stop on inf or NaN."""
        opt, images_per_step = self.opt, self.opt.batchSize * self.ranks.world
        if self.epoch_it % opt.log_every and self.epoch_it != self.per_epoch and self.step != total:
            return
        values = (self.sums / (self.step - self.window_start)).tolist()
        self.sums.zero_()
        if self.ranks.max_over_ranks([int(not all(map(math.isfinite, values)))])[0]:
            raise diverged(f"a non-finite loss or D output in iterations {self.window_start + 1} "
                           f"to {self.step}", self.epoch, self.last_good)
        loss_d, loss_g, d_x, d_g_z1, d_g_z2 = values
        seconds = max(time.monotonic() - self.tick, 1e-9)
        rate = (self.step - self.tick_step) * images_per_step / seconds
        self.tick, self.tick_step, self.window_start = time.monotonic(), self.step, self.step
        epoch_left, run_left = (datetime.timedelta(seconds=round(n * images_per_step / rate))
                                for n in (self.per_epoch - self.epoch_it, total - self.step))
        self.log(f"[{self.epoch}/{opt.niter}][{self.epoch_it}/{self.per_epoch}] "
                 f"Loss_D: {loss_d:.4f} Loss_G: {loss_g:.4f} D(x): {d_x:.4f} "
                 f"D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f} | {rate:.0f} img/s | "
                 f"left: epoch {epoch_left} run {run_left}", flush=True)
        warning = self.watch_for_collapse(d_g_z1, loss_g) if self.ranks.is_main else ""
        row = (self.epoch, self.epoch_it, self.step, *values, rate, warning)
        for k, v in zip(LOG_FIELDS, row):
            self.history[k].append(v)
        self.ranks.on_main(write_rows, os.path.join(opt.outf, "losses.csv"), [row])

    def samples(self, z):
        """The images of the grids and the score: the averaged G's with --ema."""
        return sample(self.shown_G, z, self.opt.sample_bn == "batch").float()

    def watch_for_collapse(self, d_g_z, loss_g, stretch=200):
        """Two failures with finite losses, said once and named in losses.csv: D wins outright
        (D(G(z)) < 0.01 for `stretch` iterations: G's gradient vanishes), or the fixed noise's
        samples stop varying (mode collapse)."""
        self.d_wins_since = (self.d_wins_since or self.step) if d_g_z < 0.01 else None
        kinds = {}
        if self.d_wins_since is not None and self.step - self.d_wins_since >= stretch:
            kinds["d_wins"] = (f"D has rejected nearly every fake for "
                               f"{self.step - self.d_wins_since} iterations (D(G(z)) {d_g_z:.4f}, "
                               f"Loss_G {loss_g:.2f}): G has stopped learning")
        spread = math.inf
        if self.step >= 200:
            spread = self.samples(self.fixed_noise).std(0).mean().item()
        if spread < 0.1 * self.real_spread:
            kinds["collapsed"] = (f"the samples from the fixed noise have stopped varying "
                                  f"(per-pixel spread {spread:.3f}, the data's "
                                  f"{self.real_spread:.3f}): mode collapse")
        for kind in [k for k in kinds if k not in self.warned]:
            self.warned.add(kind)
            warn(f"iteration {self.step} (epoch {self.epoch}): {kinds[kind]}; try a lower --lr, "
                 "another --manualSeed, or --resume from an earlier checkpoint copy")
        return "+".join(kinds)

    def save(self, epoch_done=None):
        """checkpoint.pt and, when an epoch is done, its files, written by rank 0; every rank takes
        part (the checkpoint holds each rank's noise state)."""
        noise_rngs = self.ranks.gather(self.noise_rng.get_state())
        ckpt = {"format": FORMAT, "netG": self.netG.state_dict(), "netD": self.netD.state_dict(),
                "optG": self.optG.state_dict(), "optD": self.optD.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iter": self.epoch_it,
                "step": self.step, "fixed_noise": self.fixed_noise.cpu(), "config": self.config,
                "noise_rng": noise_rngs, "history": self.history, "scores": self.scores,
                "log_window": [self.window_start, self.sums.cpu()]}
        if self.netG_ema is not None:
            ckpt["netG_ema"] = self.netG_ema.state_dict()
        scored = self.ranks.on_main(self.write_files, ckpt, epoch_done)
        self.last_good = None if self.opt.dry_run else self.ckpt_path
        self.last_save = time.monotonic()
        return scored

    def write_files(self, ckpt, epoch_done):
        """An epoch's sample grid, weights, loss plot and score, then the checkpoint; nothing if
        the state is not finite. Returns the epoch line's words on the score."""
        outf, scored, best_G = self.opt.outf, "", self.best_G
        if not all_finite(ckpt):
            raise diverged(f"non-finite weights, optimizer state or losses at step {self.step}",
                           self.epoch, self.last_good)
        if epoch_done is not None and self.opt.score_images:
            scored = self.score(epoch_done)
        ckpt["best_G"] = self.best_G
        if epoch_done is not None:
            save_grid(self.samples(self.fixed_noise),
                      os.path.join(outf, f"fake_samples_epoch_{epoch_done:03d}.png"))
            for name in ("netG", "netG_ema", "netD"):
                if name in ckpt:
                    path = os.path.join(outf, f"{name}_epoch_{epoch_done}.pth")
                    atomic_write(path, lambda f: torch.save(ckpt[name], f))
            plot_losses(self.history, os.path.join(outf, "losses.png"))
        if not self.opt.dry_run:
            atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))
            if self.best_G is not best_G:  # a better G: after the checkpoint, which holds it too
                write_best_G(outf, self.best_G)
        return scored

    def score(self, epoch_done):
        """The epoch's score (lower is better) in scores.csv, and its G as best_G when no epoch
        scored lower: samples from fixed noise against the real images drawn at the start."""
        opt = self.opt
        net, real_features = self.scorer
        noise = torch.Generator().manual_seed(0)
        z = torch.randn(len(real_features), opt.nz, 1, 1, generator=noise)
        fake = torch.cat([self.samples(part.to(self.device)) for part in z.split(opt.batchSize)])
        score = frechet_distance(real_features, features(net, fake))
        best = min(self.scores, key=lambda row: row[1], default=[None, math.inf])
        self.scores.append([epoch_done, score])
        write_rows(os.path.join(opt.outf, "scores.csv"), [self.scores[-1]])
        if score < best[1]:
            best = self.scores[-1]
            self.best_G = {k: v.cpu().clone() for k, v in self.shown_G.state_dict().items()}
        return f"; score {score:.4g}, best {best[1]:.4g} (epoch {best[0]})"


# ---- The command line: the flags, the commands that make images without training, main
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise Fail(EXIT_USAGE, f"{message} (see --help)")


def number(kind, allowed, ok):
    """An argparse type: a number of `kind` for which ok(value) holds; else says what is allowed."""
    def convert(text):
        with contextlib.suppress(ValueError):
            if ok(kind(text)):
                return kind(text)
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
    return convert


count = number(int, "a whole number, 0 or more", lambda v: v >= 0)
positive = number(int, "a whole number, 1 or more", lambda v: v >= 1)
rate = number(float, "a positive number", lambda v: 0 < v < math.inf)
fraction = number(float, "in [0, 1)", lambda v: 0 <= v < 1)
minutes = number(float, "0 or more", lambda v: 0 <= v < math.inf)


def build_parser():
    p = Parser(description="Train a DCGAN, or make images.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # The flags of pytorch/examples dcgan/main.py, same names and meanings: its command lines work
    a("--dataset", default="celeba", help="imagenet and lfw are folder data sets",
      choices=["celeba", "folder", "imagenet", "lfw", "cifar10", "mnist", "lsun", "fake",
               "synthetic"])
    a("--dataroot", help="path to the data set (not needed for fake and synthetic)")
    a("--workers", type=count, default=2, help="data loading worker processes")
    a("--batchSize", type=positive, default=128, help="batch size a process")
    a("--imageSize", type=int, default=64, choices=[16, 32, 64, 128, 256], help="height and width")
    a("--nz", type=positive, default=100, help="size of the latent z vector")
    a("--ngf", type=positive, default=64, help="generator width")
    a("--ndf", type=positive, default=64, help="discriminator width")
    a("--niter", type=positive, default=25, help="number of epochs to train for")
    a("--lr", type=rate, default=0.0002, help="Adam learning rate")
    a("--beta1", type=fraction, default=0.5, help="Adam beta1")
    a("--dry-run", action="store_true", help="run a single training iteration, then save and exit")
    a("--ngpu", type=positive, default=1, help="number of GPUs to use through nn.DataParallel")
    a("--netG", default="", help="generator weights to start from (or to --generate with)")
    a("--netD", default="", help="discriminator weights to start from")
    a("--outf", default="out", help="folder for samples, weights, checkpoint and logs")
    a("--manualSeed", type=count, default=999, help="seed for weights, data order and noise")
    a("--classes", default="bedroom", help="comma-separated LSUN classes")
    a("--accel", action="store_true", help="use the current accelerator (torch.accelerator)")
    a("--cuda", action="store_true", help="use CUDA")
    add_own_flags(a)
    return p


def add_own_flags(a):
    """The flags that pytorch/examples does not have."""
    a("--device", default="", help="cpu, cuda, cuda:1, mps, xpu (default: the best present)")
    a("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
      help="mixed precision (auto: bf16 where the device has it natively, else off)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
      help="each step as one CUDA graph, on one CUDA GPU without fp16")
    a("--preload", action=argparse.BooleanOptionalAction, default=True,
      help="decode the data set once, not every epoch")
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    a("--cache-dir", default=os.path.join(cache, "dcgan"),
      help="where decoded data sets are kept, '' for none")
    a("--ema", type=fraction, default=0.0, metavar="DECAY",
      help="also keep a moving average of G, e.g. 0.999")
    a("--sample-bn", default="batch", choices=["batch", "eval"],
      help="BatchNorm statistics when sampling")
    a("--score-images", type=count, default=1000, metavar="N",
      help="real images and samples of the score after each epoch, whose network learns on "
           "4N (0: off)")
    a("--log-every", type=positive, default=50, help="log every N iterations")
    a("--save-every", type=count, default=0, help="also save the checkpoint every N iterations")
    a("--save-minutes", type=minutes, default=10.0, help="also save it every N minutes (0: off)")
    a("--max-steps", type=count, default=0,
      help="stop (and save) after N iterations in this run (0: no limit)")
    a("--resume", nargs="?", const="", metavar="PATH",
      help="continue from a checkpoint (default: OUTF/checkpoint.pt)")
    a("--generate", type=positive, default=0, metavar="N",
      help="write N images from --netG into OUTF/generated/ and exit")
    a("--interpolate", type=positive, default=0, metavar="N",
      help="write N latent walks of --netG and exit")
    a("--export-real", type=positive, default=0, metavar="N",
      help="write N training images as G sees them and exit")


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    if (opt.generate or opt.interpolate) and not opt.netG:
        raise Fail(EXIT_USAGE, "--generate and --interpolate need --netG PATH (weights or a "
                               "checkpoint)")
    if opt.dry_run and opt.resume is not None:
        raise Fail(EXIT_USAGE, "--dry-run writes no checkpoint and cannot --resume one; drop one "
                               "of them")
    if opt.amp == "bf16" and opt.ngpu > 1:  # DataParallel's threads would autocast to fp16
        raise Fail(EXIT_USAGE, "--amp bf16 does not reach nn.DataParallel's replicas; for bf16 on "
                               "several GPUs use torchrun --nproc_per_node instead of --ngpu")
    if opt.dataset in ("imagenet", "lfw"):
        opt.dataset = "folder"
    if opt.dataroot is None and opt.dataset not in ("fake", "synthetic") and \
            not (opt.generate or opt.interpolate):
        raise Fail(EXIT_USAGE, f"--dataroot is required for --dataset {opt.dataset} (--dataset "
                               "synthetic needs none)")
    opt.nc = 1 if opt.dataset == "mnist" else 3
    return opt


def generated_images(netG, nz, n, batch_stats, rng):
    """n uint8 images of G, drawn in full batches of 256: each sees a full batch's statistics."""
    for start in range(0, n, 256):
        z = torch.randn(256, nz, 1, 1, device=rng.device, generator=rng)
        images = sample(netG, z, batch_stats)[:n - start].float().cpu()
        yield images.add(1).mul(127.5).add(0.5).clamp(0, 255).byte()


def export_real(opt):
    """N training images as the networks see them: the real side of an FID."""
    dataset = open_dataset(opt)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(opt.manualSeed))
    folder = os.path.join(opt.outf, "real")
    write_png_folder(folder, uint8_batches(dataset, order[:opt.export_real].tolist(), 256,
                                           opt.workers))
    print(f"wrote {min(opt.export_real, len(dataset))} training images to {folder}/")


def make_images(opt, device):
    """--generate: N PNGs (what FID tools read) and a grid. --interpolate: N rows of 10 images, G
    along the arc between two random z."""
    netG, nz = load_generator(opt.netG)
    netG, rng = netG.to(device), torch.Generator(device).manual_seed(opt.manualSeed)
    batch_stats = opt.sample_bn == "batch"
    if opt.interpolate:
        path = os.path.join(opt.outf, "interpolation.png")
        prepare_outf(opt.outf)
        walks = latent_walks(opt.interpolate, 10, nz, rng)  # (N * 10, nz, 1, 1)
        save_grid(sample(netG, walks, batch_stats).float().cpu(), path, nrow=10)
        print(f"wrote {opt.interpolate} latent walks of 10 steps to {path}")
        return
    folder, path = os.path.join(opt.outf, "generated"), os.path.join(opt.outf, "generated_grid.png")
    grid = write_png_folder(folder, generated_images(netG, nz, opt.generate, batch_stats, rng))
    save_grid(grid, path)
    print(f"wrote {opt.generate} images to {folder}/ and a grid to {path}")


def train(opt, device, ranks):
    """Set up (a mistake on any rank ends every rank with one line), load the data, start or
    resume, and loop; no phase runs a collective inside another's agreement."""
    ranks.agree(check_outf, opt, ranks.is_main)
    dataset = ranks.local_first(open_dataset, opt)  # (a download, once a node)
    same_images, cache_name = ranks.agree(data_keys, opt, dataset)
    run = ranks.agree(Run, opt, device, ranks, same_images)
    # each rank has its own files: if they differ, so do the ranks' steps and collectives
    seen = ranks.gather((same_images, run.ckpt and run.ckpt["step"]))
    if len(set(seen)) > 1:
        raise Fail(EXIT_DATA, f"the processes see other data or checkpoints (data and step by "
                              f"rank: {seen}); give every node the same --dataroot and --outf")
    # with a cache, each node's local rank 0 decodes into it and the others map its file
    first = ranks.local_first if opt.cache_dir else ranks.agree
    data = first(preloaded, opt, dataset, cache_name, device, run.log)
    run.start(data)
    return run.loop()


def main(argv=None):
    """Runs the command line and returns the exit code; a mistake in the input is one line on
    stderr (README's table)."""
    try:
        opt = parse_args(argv)  # (every rank sees the same mistake in the flags)
        ranks = Ranks(int(os.environ.get("WORLD_SIZE", 1)))
        device = ranks.agree(pick_device, opt, ranks.local_rank, ranks.world)
        code = 0
        if not (opt.generate or opt.interpolate or opt.export_real):
            code = train(opt, device, ranks)
        elif ranks.is_main and opt.export_real:  # one process does these
            export_real(opt)
        elif ranks.is_main:
            make_images(opt, device)
    except Fail as e:
        if not e.quiet:
            print(f"dcgan.py: error: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        print("dcgan.py: interrupted", file=sys.stderr)
        code = 130
    if dist.is_initialized():  # after the error's traceback, which holds DDP, has gone
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())

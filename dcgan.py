"""DCGAN in one file: Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", 2015 (arXiv:1511.06434).

Train a face generator, by default on CelebA at 64x64:

  python dcgan.py --dataset synthetic --imageSize 16 --batchSize 64 --niter 4     # CPU, no download
  python dcgan.py --dataroot celeba --cuda                                         # one GPU
  python dcgan.py --dataroot celeba --cuda --ngpu 2                                # DataParallel
  torchrun --nproc_per_node=8 dcgan.py --dataroot celeba                           # DDP, one node
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST \\
           --master_port=29500 dcgan.py --dataroot celeba                         # DDP, two nodes
  python dcgan.py --resume --outf out --dataroot celeba --cuda                     # continue a run
  python dcgan.py --generate 1000 --netG out/netG_epoch_24.pth --outf fid          # images, no training
  python dcgan.py --export-real 1000 --dataroot celeba --outf fid                  # real side of an FID
  python dcgan.py --interpolate 8 --netG out/checkpoint.pt --outf walks            # latent walks

The file reads as a lesson first: the networks and their initialisation, one training iteration,
sampling. A reader who stops there has read a complete DCGAN. The machinery follows, in the order
a run uses it: data, checkpoints and files, devices and processes, the speed of a step, the run,
the command line. Import it to use the pieces: nothing runs on import.
"""
import argparse
import copy
import datetime
import glob
import hashlib
import inspect
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.utils as vutils
from PIL import Image
from torchvision.transforms import v2

CHECKPOINT_FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# Exit codes (README has the table). Each error prints one line naming the flag, path or file.
EXIT_USAGE, EXIT_DATA, EXIT_FILE, EXIT_DEVICE, EXIT_OUTPUT, EXIT_DIVERGED = 2, 3, 4, 5, 6, 7


class Fail(Exception):
    """A mistake or condition a person can act on: main() prints the message and exits with code."""

    def __init__(self, code, message, quiet=False):
        super().__init__(message)
        self.code, self.quiet = code, quiet  # quiet: another rank prints it


# ------------------------------------------------------------------------------------------------
# The networks (paper, section 3): all-convolutional, BatchNorm, ReLU in G with Tanh at the
# output, LeakyReLU(0.2) in D, no pooling and no fully connected hidden layers. The number of
# blocks follows log2(image size); at 64x64 both equal pytorch/examples layer for layer,
# state-dict keys included (main.0.weight, ...), so its .pth files load here.
# ------------------------------------------------------------------------------------------------

def check_size(image_size):
    if image_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"image_size must be a power of two from 16 to 256, got {image_size}")
    return int(math.log2(image_size)) - 3  # blocks between the 4x4 stage and the image


class Generator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3, image_size=64):
        super().__init__()
        n = check_size(image_size)
        width = ngf * 2 ** n
        # (B, nz, 1, 1) -> (B, ngf*2^n, 4, 4): the paper's projection of z, as a convolution
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(n):  # each block doubles the size and halves the width
            # (B, w, s, s) -> (B, w/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # (B, ngf, S/2, S/2) -> (B, nc, S, S), no BatchNorm on the output layer (paper, section 3)
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    """Returns logits, not probabilities: the sigmoid lives inside BCEWithLogitsLoss, which is the
    same objective but numerically stable and safe under autocast."""

    def __init__(self, nc=3, ndf=64, image_size=64):
        super().__init__()
        n = check_size(image_size)
        # (B, nc, S, S) -> (B, ndf, S/2, S/2), no BatchNorm on the input layer (paper, section 3)
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
    """Paper, section 4: all weights from N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# One training iteration (Goodfellow et al. 2014, algorithm 1, with k = 1; paper, section 4)
# ------------------------------------------------------------------------------------------------

def adam(params, lr, beta1):
    """Adam as in the paper (section 4): lr 0.0002, and beta1 0.5, because the default 0.9 made
    training oscillate. The fused kernel updates all tensors in one launch and can skip an update
    on the device, without a host sync (see Trainer.update)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), fused=True)
    except RuntimeError:  # a device without a fused Adam
        return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


def train_step(tr, real_u8, noise):
    """One update of D, then one of G, on a batch of uint8 images and a batch of z. `tr` is the
    Trainer (section "The speed of a step"): it holds G and D as they run (`tr.g`, `tr.d`, maybe
    wrapped for several GPUs or compiled), their optimizers, and `tr.update`, which is backward and
    the Adam step, skipped when a value is not finite. Returns Loss_D, Loss_G, D(x), and D(G(z))
    before and after D's update, as tensors on the device: reading them would wait for the GPU."""
    # Images to [-1, 1], the range of G's Tanh (paper, section 3)
    real = real_u8.float().div_(127.5).sub_(1).contiguous(memory_format=tr.memory_format)
    b = real.shape[0]
    ones, zeros = torch.ones(b, device=real.device), torch.zeros(b, device=real.device)
    # D's target for real images: 1, or less with one-sided label smoothing (Salimans et al. 2016,
    # section 3.4); the fakes' target stays 0, and G's stays 1
    real_targets = torch.full((b,), tr.real_label, device=real.device)

    ############################
    # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
    ############################
    tr.optD.zero_grad(set_to_none=True)
    with tr.autocast():
        fake = tr.g(noise)  # (B, nc, S, S)
        # Real and fake go through D as separate batches, so each BatchNorm sees one kind of
        # image (pytorch/examples does the same). fake is detached: this step trains D only.
        out_real = tr.d(real)
        out_fake = tr.d(fake.detach())
    # D returns logits; BCE with logits is log(sigmoid) done stably, and safe under autocast
    loss_d = (F.binary_cross_entropy_with_logits(out_real.float(), real_targets)
              + F.binary_cross_entropy_with_logits(out_fake.float(), zeros))
    tr.update(tr.optD, loss_d, torch.isfinite(loss_d) & torch.isfinite(out_real).all() & torch.isfinite(out_fake).all())

    ############################
    # (2) Update G: maximize log(D(G(z))), the non-saturating loss (Goodfellow et al. 2014,
    # section 3): log(1 - D(G(z))) has vanishing gradients early, when D rejects every fake.
    # The fake batch is reused through the updated D. D's parameters need no gradients here.
    ############################
    tr.optG.zero_grad(set_to_none=True)
    tr.netD.requires_grad_(False)
    with tr.autocast():
        out_g = tr.d_for_g(fake)
    loss_g = F.binary_cross_entropy_with_logits(out_g.float(), ones)  # fake labels are real for G
    tr.update(tr.optG, loss_g, torch.isfinite(loss_g) & torch.isfinite(out_g).all())
    tr.netD.requires_grad_(True)

    with torch.no_grad():
        return loss_d, loss_g, *(torch.sigmoid(x.float()).mean() for x in (out_real, out_fake, out_g))


# ------------------------------------------------------------------------------------------------
# Sampling: images from z, the averaged G, walks through the latent space
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(netG, z, batch_stats=True):
    """G(z) for viewing. With batch_stats (the default of --sample-bn), BatchNorm normalises with the
    statistics of this batch, as in training and as the PyTorch example samples; it scored better
    than eval mode (running statistics, each image depending on its own z alone) on 11 of 12
    trained G at the example's budget and 12 of 15 at 4x it (README, Measuring sample quality).
    Either way G's own statistics are left untouched."""
    was_training = netG.training
    net = copy.deepcopy(netG).train() if batch_stats else netG.eval()
    images = net(z)
    netG.train(was_training)
    return images


@torch.no_grad()
def update_average(averaged, current, step, decay):
    """averaged = d * averaged + (1 - d) * current, over two lists of tensors (G's weights and
    BatchNorm statistics), with d warmed up as min(decay, (1 + t) / (10 + t)) at step t: a plain
    0.999 average over a short run would stay close to the random initial weights. `step` is a
    tensor on the device and the updates are foreach ops: no host sync, fine inside a CUDA graph."""
    t = step.float()
    d = torch.clamp((1 + t) / (10 + t), max=decay)
    torch._foreach_mul_(averaged, d)
    torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))


def slerp(z0, z1, t):
    """Spherical interpolation between latent vectors (paper, section 6.1: walking the latent
    space). Gaussian z of high dimension lie near a sphere; a straight line between two of them
    passes through the low-norm middle that G never saw in training, the arc does not."""
    a, b = z0.flatten(1), z1.flatten(1)
    omega = torch.arccos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)).unsqueeze(1)
    so = torch.sin(omega)
    mix = torch.where(so > 1e-6, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so.clamp(min=1e-6),
                      (1 - t) * a + t * b)  # (nearly) parallel: the line is the arc
    return mix.view_as(z0)


def latent_walks(rows, steps, nz, generator):
    """z for `rows` walks of `steps` points, row after row, each along the arc between two random z."""
    device = generator.device
    ends = torch.randn(2, rows, nz, 1, 1, device=device, generator=generator)
    t = torch.linspace(0, 1, steps, device=device).repeat(rows).unsqueeze(1)
    return slerp(ends[0].repeat_interleave(steps, 0), ends[1].repeat_interleave(steps, 0), t)


# ------------------------------------------------------------------------------------------------
# Data: every data set yields uint8 images (C, S, S); they are scaled to [-1, 1] on the device.
# ------------------------------------------------------------------------------------------------

def synthetic_faces(n, size, nc=3, seed=0):
    """A learnable face-like data set drawn with tensor ops: a head (ellipse) with two eyes and a
    mouth on a plain background, varied in colour, size and position. Seeded; no download."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, nc, size, size, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        u = lambda k=1: torch.rand(m, k, 1, 1, generator=g)  # noqa: E731 (k values per image)
        cx, cy = (u() - 0.5) * 0.4, (u() - 0.5) * 0.3
        rx = 0.45 + 0.2 * u()
        ry = rx * (1.15 + 0.2 * u())

        def ellipse(x0, y0, ax, ay):  # soft-edged mask, anti-aliased over about one pixel
            d = ((xs - x0) / ax) ** 2 + ((ys - y0) / ay) ** 2
            return torch.sigmoid((1 - d) * size / 4)

        head = ellipse(cx, cy, rx, ry)
        eye_r = rx * (0.12 + 0.05 * u())
        eyes = ellipse(cx - 0.38 * rx, cy - 0.2 * ry, eye_r, eye_r) + ellipse(cx + 0.38 * rx, cy - 0.2 * ry, eye_r, eye_r)
        mouth = ellipse(cx, cy + 0.5 * ry, rx * (0.25 + 0.2 * u()), ry * (0.06 + 0.06 * u()))
        background = u(3) * 0.8
        skin = torch.cat([0.55 + 0.4 * u(), 0.35 + 0.35 * u(), 0.25 + 0.3 * u()], 1)
        img = background * (1 - head) + skin * head
        img = img * (1 - eyes) + 0.08 * eyes
        img = img * (1 - mouth) + torch.tensor([0.6, 0.1, 0.15]).view(1, 3, 1, 1) * mouth
        if nc == 1:
            img = img.mean(1, keepdim=True)
        out[start:start + m] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def face_crop(img):
    """CelebA's aligned pictures are 178x218 with the face in the middle. Keep the centre square
    of 108/178 of the width (108x108 at full size: the face crop of the original DCGAN CelebA
    setups), at whatever scale the picture comes. A picture of another shape, such as a square
    CelebA that someone already cropped and resized, is left whole rather than padded."""
    h, w = img.shape[-2:]
    if abs(h / w - 218 / 178) > 0.03:
        return img
    return v2.functional.center_crop(img, round(w * 108 / 178))


def image_transform(dataset, size):
    """uint8 tensor in, (C, size, size) uint8 out. CelebA: the face crop, so the pixels go to the
    face rather than to hair and background. Then, for every data set: resize the short side and
    centre crop, as pytorch/examples does."""
    steps = [face_crop] if dataset == "celeba" else []
    return v2.Compose(steps + [v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def decode_image(path, nc):
    """uint8 (nc, H, W) from any image file PIL reads, whatever its mode (grey, palette, RGBA,
    CMYK, 16-bit); None when the file is missing, truncated or not an image."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit grey: PIL's convert() would clip it to white
                x = v2.functional.pil_to_tensor(im.convert("I")).clamp(0, 65535)
                return ((x * 255 + 32767) // 65535).to(torch.uint8).repeat(nc, 1, 1)
            return v2.functional.pil_to_tensor(im.convert("L" if nc == 1 else "RGB"))
    except Exception:
        return None


class ImageFiles(torch.utils.data.Dataset):
    """Image files from a list of paths. A file that cannot be read is reported by name and
    replaced by the next readable one, so batches keep their size; with substitute=False it
    comes back as None instead (the decode-once pass counts them)."""

    def __init__(self, paths, nc, transform, substitute=True):
        self.paths, self.nc, self.transform, self.substitute = paths, nc, transform, substitute

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        img = decode_image(self.paths[i], self.nc)
        return None if img is None else self.transform(img)

    def __getitem__(self, i):
        if not self.substitute:
            return self.load(i)
        for j in range(i, i + 100):
            img = self.load(j % len(self.paths))
            if img is not None:
                return img
            print(f"warning: skipped unreadable image {self.paths[j % len(self.paths)]}", file=sys.stderr)
        raise Fail(EXIT_DATA, f"100 unreadable images in a row from {self.paths[i]} on; check the data set")


class TorchvisionImages(torch.utils.data.Dataset):
    """A torchvision data set (cifar10, mnist, lsun) as uint8 images."""

    def __init__(self, base, transform):
        self.base, self.transform = base, v2.Compose([v2.ToImage(), transform])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.transform(self.base[i][0]).as_subclass(torch.Tensor)


def list_images(root):
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def celeba_folder(root):
    """Accept the folder that holds img_align_celeba/, that folder itself, or torchvision's
    CelebA layout (ROOT/celeba/img_align_celeba)."""
    for candidate in (os.path.join(root, "img_align_celeba"), os.path.join(root, "celeba", "img_align_celeba")):
        if os.path.isdir(candidate):
            return candidate
    return root


def cache_prefix(opt, folder):
    """Names the decoded cache of one data set at one size; the content hash follows it."""
    where = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:8]
    return f"{opt.dataset}-{opt.imageSize}px-{where}"


def build_dataset(opt, ranks):
    """Returns (dataset of uint8 images, number of channels, cache key or None)."""
    size, kind, root = opt.imageSize, opt.dataset, opt.dataroot
    if kind == "synthetic":
        return synthetic_faces(8192, size, 3, seed=opt.manualSeed), 3, None
    if kind == "fake":
        g = torch.Generator().manual_seed(opt.manualSeed)
        return torch.randint(0, 256, (1024, 3, size, size), generator=g, dtype=torch.uint8), 3, None
    if kind in ("cifar10", "mnist"):  # downloaded into --dataroot (made if missing), once per node
        base = ranks.local_first(lambda: open_torchvision(kind, root, opt.classes))
    elif not os.path.isdir(root):
        raise Fail(EXIT_DATA, f"--dataroot {root} is not a folder; give the folder that holds the {kind} images")
    elif kind == "lsun":
        base = open_torchvision(kind, root, opt.classes)
    else:
        folder = celeba_folder(root) if kind == "celeba" else root
        paths = list_images(folder)
        if not paths:
            hint = " (expected ROOT/img_align_celeba/*.jpg, see README)" if kind == "celeba" else ""
            raise Fail(EXIT_DATA, f"--dataroot {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...){hint}")
        stats = hashlib.sha1()
        for p in paths:
            st = os.stat(p)
            stats.update(f"{p} {st.st_size} {st.st_mtime_ns}\n".encode())
        return ImageFiles(paths, 3, image_transform(kind, size)), 3, f"{cache_prefix(opt, folder)}-{stats.hexdigest()[:16]}"
    key = f"{cache_prefix(opt, root)}-{hashlib.sha1(f'{opt.classes} {len(base)}'.encode()).hexdigest()[:16]}"
    return TorchvisionImages(base, image_transform(kind, size)), 1 if kind == "mnist" else 3, key


def open_torchvision(kind, root, classes):
    try:
        if kind == "lsun":
            return torchvision.datasets.LSUN(root=root, classes=[c + "_train" for c in classes.split(",")])
        os.makedirs(root, exist_ok=True)
        return (torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.MNIST)(root=root, download=True)
    except Exception as e:
        raise Fail(EXIT_DATA, f"could not open {kind} in --dataroot {root}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              + ("download it there (see README)" if kind == "lsun" else "check the network, or download it there yourself (see README)"))


def decode_all(dataset, workers, log, out):
    """One pass over the data set into `out`, a preallocated uint8 tensor (N, C, S, S) in memory
    or in a memory-mapped file, showing progress; returns how many images it now holds. Unreadable
    images are skipped, counted and named; more than 1% of them stops the run."""
    source = dataset
    if isinstance(dataset, ImageFiles):
        source = ImageFiles(dataset.paths, dataset.nc, dataset.transform, substitute=False)
    loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=workers, collate_fn=stack_readable)
    bad, done, good, last = [], 0, 0, time.monotonic()
    for chunk, unreadable in loader:
        if chunk is not None:
            out[good:good + len(chunk)] = chunk
            good += len(chunk)
        bad += [dataset.paths[done + i] for i in unreadable]
        done += len(unreadable) + (0 if chunk is None else len(chunk))
        if time.monotonic() - last > 5 or done == len(dataset):
            log(f"decoding the data set once: {done}/{len(dataset)} images ({100 * done // len(dataset)}%)")
            last = time.monotonic()
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"warning: skipped {len(bad)} unreadable image(s): {names}", file=sys.stderr)
        if len(bad) > max(1, len(dataset) // 100):
            raise Fail(EXIT_DATA, f"{len(bad)} of {len(dataset)} images in --dataroot could not be read "
                                  f"(first: {bad[0]}); remove or replace them")
    if not good:
        raise Fail(EXIT_DATA, "no readable images in --dataroot")
    return good


def stack_readable(items):
    """Collate for the decode pass: one tensor of the readable images (one shared-memory block
    per batch, not one per image) and the positions of the unreadable ones."""
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), [i for i, x in enumerate(items) if x is None]


def load_data(opt, dataset, key, nc, device, ranks, log, warn):
    """The data set as one uint8 tensor (N, C, S, S), or `dataset` itself to decode every epoch
    with --workers processes (--no-preload, or when there is room for neither of these):
    - the cache in --cache-dir: decoded once, by one process per node, straight into a
      memory-mapped file, and read back memory-mapped, so memory use stays about a batch of
      workers whatever the size of the data set (CelebA at 256x256 is 37 GiB);
    - memory, without a cache, when the decoded set fits in half of the memory available.
    On a GPU the tensor moves to the GPU when it fits in half of its free memory."""
    if isinstance(dataset, torch.Tensor):
        data = dataset
    elif opt.preload is False:
        return dataset
    else:
        shape = (len(dataset), nc, opt.imageSize, opt.imageSize)
        data = None
        if opt.cache_dir and key:
            data = ranks.local_first(lambda: cached_decode(opt, dataset, key, shape, log, warn, ranks.local_rank == 0))
        if data is None:
            if not opt.preload and math.prod(shape) * ranks.local_world > available_memory() // 2:
                warn(f"the decoded data set ({math.prod(shape) / 2**30:.1f} GiB) does not fit in memory: "
                     "decoding it every epoch; give --cache-dir a disk with room for it to decode it once")
                return dataset
            data = torch.empty(shape, dtype=torch.uint8)
            data = data[:decode_all(dataset, opt.workers, log, data)]
    if device.type == "cuda" and data.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        return data.to(device)
    return data


def cached_decode(opt, dataset, key, shape, log, warn, write=True):
    """The decoded data set from its cache file, after decoding it there first when `write`.
    The file holds raw uint8 (N, C, S, S), is named by the key and N, and is read memory-mapped.
    Returns None, with a warning, when the cache cannot be written (no room, no permission)."""
    item = math.prod(shape[1:])
    for path in glob.glob(os.path.join(opt.cache_dir, f"{key}-*.u8")):
        n = int(path[:-3].rsplit("-", 1)[1])
        if os.path.getsize(path) == n * item:
            log(f"data set: {n} images, memory-mapped from cache {path}")
            return torch.from_file(path, shared=False, size=n * item, dtype=torch.uint8).view(n, *shape[1:])
    if not write:
        return None
    tmp = temporary_name(os.path.join(opt.cache_dir, key + ".u8"))
    try:
        os.makedirs(opt.cache_dir, exist_ok=True)
        clean_stale_temporaries(opt.cache_dir)
        with open(tmp, "wb") as f:  # take the room now rather than find it missing mid-decode
            (getattr(os, "posix_fallocate", None) or (lambda fd, _, size: os.ftruncate(fd, size)))(f.fileno(), 0, math.prod(shape))
        out = torch.from_file(tmp, shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)
        n = decode_all(dataset, opt.workers, log, out)
        del out
        os.truncate(tmp, n * item)
        path = os.path.join(opt.cache_dir, f"{key}-{n}.u8")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if not isinstance(e, OSError):
            raise
        warn(f"could not cache the decoded data set in --cache-dir {opt.cache_dir} ({e.strerror or e}); "
             "going on without the cache")
        return None
    for old in glob.glob(os.path.join(opt.cache_dir, key.rsplit("-", 1)[0] + "-*")):
        if old != path:
            remove_quietly(old)  # an older decode of the same folder at the same size
    log(f"cached the decoded data set in {path}, memory-mapped from there")
    return torch.from_file(path, shared=False, size=n * item, dtype=torch.uint8).view(n, *shape[1:])


def available_memory():
    """Bytes this process can still take: MemAvailable, capped by a cgroup memory limit."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 8 << 30
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open("/sys/fs/cgroup/" + limit) as fl, open("/sys/fs/cgroup/" + usage) as fu:
                free = min(free, int(fl.read()) - int(fu.read()))
        except (OSError, ValueError):  # no such cgroup file, or no limit ("max")
            pass
    return free


class Batches:
    """Each epoch's batches for this process. The order comes from (seed, epoch) alone, so a
    resumed run sees exactly the batches an uninterrupted run would; under DDP each rank takes its
    share of that order, as DistributedSampler does. Incomplete batches are dropped, keeping
    BatchNorm statistics on full batches."""

    def __init__(self, data, batch_size, seed, rank, world, workers, device):
        self.data, self.bs, self.workers, self.device = data, batch_size, workers, device
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size

    def epoch(self, epoch, start):
        """Yields uint8 batches on the device, from batch `start` of `epoch` on."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[start * self.bs:self.per_epoch * self.bs]
        if isinstance(self.data, torch.Tensor):
            order = torch.tensor(order, device=self.data.device)
            for i in range(0, len(order), self.bs):
                yield self.data[order[i:i + self.bs]].to(self.device, non_blocking=True)
        else:
            loader = torch.utils.data.DataLoader(
                self.data, batch_size=self.bs, sampler=order, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", drop_last=True)
            for batch in loader:
                yield batch.to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints and files. Every file is written atomically: a crash leaves the old or the new
# file, whole, never a torn one.
# ------------------------------------------------------------------------------------------------

def temporary_name(path):
    """Where `path` is written before it is renamed into place: beside it, named by host and pid
    (several nodes may share a cache folder)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_quietly(path):
    try:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    except OSError:
        pass


def fsync_folder(folder):
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(f) into a temporary file, then flush, fsync and rename it over `path`. Any failure
    on the way (disk full, quota, permissions, an I/O error, also inside torch.save) removes the
    temporary file, keeps the previous `path` intact and raises one line."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(path))
    except Exception as e:
        remove_quietly(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):  # torch.save wraps the OSError
            cause = cause.__context__
        if cause is None and not isinstance(e, RuntimeError):
            raise
        reason = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0]
        raise Fail(EXIT_OUTPUT, f"could not write {path}: {reason}; free disk space or fix the permissions "
                                "of its folder (the previous file there is intact)")


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_stale_temporaries(folder):
    """Temporary files left by a process that died while writing: this host's whose process is
    gone, and other hosts' after a day."""
    for tmp in glob.glob(os.path.join(folder, ".*.tmp-*")):
        host, _, pid = tmp.rsplit(".tmp-", 1)[1].rpartition("-")
        try:
            if host in ("", socket.gethostname()):
                os.kill(int(pid), 0)  # raises when no such process
            elif time.time() - os.path.getmtime(tmp) < 86400:
                continue
            else:
                raise ProcessLookupError
        except (ProcessLookupError, ValueError):
            remove_quietly(tmp)
        except OSError:  # alive, another user's
            pass


def prepare_outf(outf):
    try:
        os.makedirs(outf, exist_ok=True)
        probe = os.path.join(outf, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise Fail(EXIT_OUTPUT, f"--outf {outf} cannot be written ({e.strerror or e}); choose another folder")


def load_file(path, what):
    """torch.load with the safe loader only: a file that would run code is refused, never run.
    torch writes its files as zip archives with a CRC32 per record, so damage is found here."""
    if not os.path.isfile(path):
        raise Fail(EXIT_FILE, f"{what} {path} does not exist")
    damaged = f"{what} {path} is damaged"
    try:
        if zipfile.is_zipfile(path):
            record = zipfile.ZipFile(path).testzip()
            if record is not None:
                raise Fail(EXIT_FILE, f"{damaged}: its part {record} fails its checksum; use an earlier copy")
        with open(path, "rb") as f:
            head = f.read(2)
        with warnings.catch_warnings():  # a crafted file can make the loader warn; one line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Fail:
        raise
    except (zipfile.BadZipFile, OSError, EOFError):
        raise Fail(EXIT_FILE, f"{damaged} or truncated; use an earlier copy")
    except Exception as e:
        pickle = zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
        reason = "it holds Python objects beyond tensors, refused unread" if "weights_only" in str(e) and pickle \
            else "it is empty, truncated, damaged or not a PyTorch file"
        raise Fail(EXIT_FILE, f"{what} {path} cannot be loaded: {reason}")


def clean_state_dict(state):
    """Drop the prefixes DataParallel/DDP (module.) and torch.compile (_orig_mod.) add."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def generator_shape(state):
    """(nz, ngf, nc, image_size) of a generator state dict."""
    convs = sorted((k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4),
                   key=lambda k: int(k.split(".")[1]))
    first, last = state[convs[0]], state[convs[-1]]
    return first.shape[0], last.shape[0], last.shape[1], 2 ** (len(convs) + 1)


def load_weights(net, path, what, state=None):
    """A state dict from --netG / --netD (pytorch/examples' files included), or the matching part
    of a checkpoint, into `net`; one line when it does not fit."""
    state = load_file(path, what) if state is None else state
    if isinstance(state, dict) and "netG" in state and "format" in state:
        state = state["netG" if what == "--netG" else "netD"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Fail(EXIT_FILE, f"{what} {path} is not a state dict of tensors")
    state = clean_state_dict(state)
    own = net.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own]
    if wrong or extra:
        k = (wrong or extra)[0]
        saved = tuple(state[k].shape) if k in state else "missing"
        wanted = tuple(own[k].shape) if k in own else "absent"
        raise Fail(EXIT_FILE, f"{what} {path} does not fit the model built from the flags: {k} is {saved} "
                              f"in the file, {wanted} here; check --nz --ngf --ndf --imageSize and the data set")
    net.load_state_dict(state)


def load_generator(opt):
    """The generator of --netG (weights or a checkpoint), its shape read from the file."""
    state = load_file(opt.netG, "--netG")
    if isinstance(state, dict) and "netG" in state and "format" in state:
        state = state.get("netG_ema", state["netG"])  # a checkpoint: its averaged G when it has one
    try:
        nz, ngf, nc, size = generator_shape(clean_state_dict(state))
        netG = Generator(nz, ngf, nc, size)
    except Exception:
        raise Fail(EXIT_FILE, f"--netG {opt.netG} is not a generator state dict")
    load_weights(netG, opt.netG, "--netG", state)
    return netG.eval()


ARCHITECTURE = ("nz", "ngf", "ndf", "nc", "imageSize", "batchSize", "manualSeed")


def make_checkpoint(tr, epoch, it, step, fixed_noise, config, history, noise_gen, ranks):
    """Everything a run needs to go on exactly, RNG states of every rank included: under torchrun
    each rank draws its own noise, and after a resume each must draw what it would have drawn."""
    rng = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    every_rank = ranks.gather(rng)
    return {"format": CHECKPOINT_FORMAT, "netG": tr.netG.state_dict(), "netD": tr.netD.state_dict(),
            "optG": tr.optG.state_dict(), "optD": tr.optD.state_dict(),
            "scaler": tr.scaler.state_dict() if tr.scaler else {},
            "epoch": epoch, "iter": it, "step": step, "fixed_noise": fixed_noise.cpu(),
            "config": config, "rng": every_rank[0], "rng_ranks": every_rank, "history": history,
            **({"netG_ema": tr.netG_ema.state_dict()} if tr.netG_ema is not None else {})}


def read_checkpoint(path, config):
    ckpt = load_file(path, "--resume checkpoint")
    needed = {"format", "netG", "netD", "optG", "optD", "epoch", "iter", "step", "fixed_noise", "config", "rng", "history"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise Fail(EXIT_FILE, f"--resume {path} is not a checkpoint written by dcgan.py (give OUTF/checkpoint.pt)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise Fail(EXIT_FILE, f"--resume {path} has checkpoint format {ckpt['format']}; this dcgan.py reads {CHECKPOINT_FORMAT}")
    if not all(bool(torch.isfinite(t).all()) for t in tensors_in(ckpt) if t.is_floating_point()):
        raise Fail(EXIT_FILE, f"--resume {path} is damaged: it holds inf or NaN, which dcgan.py never saves; use an earlier copy")
    diff = [f"{k} {ckpt['config'].get(k)} saved vs {config[k]} requested"
            for k in ARCHITECTURE if ckpt["config"].get(k) != config[k]]
    if diff:
        raise Fail(EXIT_FILE, f"--resume {path} was made with other settings: {'; '.join(diff)}; "
                              "pass the saved values or start a new --outf")
    saved_world = ckpt["config"].get("world", 1)
    if saved_world != config["world"]:
        raise Fail(EXIT_FILE, f"--resume {path} was written by {saved_world} process(es), this run has {config['world']}: "
                              f"resume with {saved_world} (the data shards and each rank's noise depend on it)")
    return ckpt


def tensors_in(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in tensors_in(item)]


def restore_rng(ckpt, noise_gen, rank):
    rng = ckpt.get("rng_ranks", [ckpt["rng"]])[rank]  # this rank's own states
    random.setstate((3, tuple(rng["python"]), None))
    torch.set_rng_state(rng["torch"])
    noise_gen.set_state(rng["noise"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


LOG_FIELDS = ["epoch", "iter", "step", "loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "img_per_s", "warning"]


def csv_line(values):
    return ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) + "\n"


def start_losses(outf, history):
    """losses.csv as the run starts: the header and, after a resume, the checkpoint's rows (rows
    logged after that save belong to steps that will run again). Then appended to, a row a log."""
    rows = [csv_line(LOG_FIELDS)] + [csv_line(row) for row in zip(*(history[k] for k in LOG_FIELDS))]
    atomic_write(os.path.join(outf, "losses.csv"), lambda f: f.write("".join(rows).encode()))


def append_losses(outf, values):
    try:
        with open(os.path.join(outf, "losses.csv"), "a") as f:
            f.write(csv_line(values))
    except OSError as e:
        raise Fail(EXIT_OUTPUT, f"could not write {os.path.join(outf, 'losses.csv')}: {e.strerror or e}; "
                                "free disk space or fix the permissions of its folder")


def plot_losses(outf, history):
    """losses.png, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(history["step"], history["loss_g"], label="G")
    ax.plot(history["step"], history["loss_d"], label="D")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Generator and discriminator loss")
    ax.legend()
    atomic_write(os.path.join(outf, "losses.png"), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def save_grid(images, path):
    atomic_write(path, lambda f: vutils.save_image(images, f, format="png", normalize=True, value_range=(-1, 1)))


def to_pixels(images):
    """[-1, 1] floats to uint8, rounded as torchvision's save_image rounds."""
    return images.add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8)


def write_png_folder(folder, batches):
    """Each uint8 image of each batch as folder/NNNNNN.png. They are written plainly into a
    temporary folder, made durable once and renamed `folder` when all are there: fast for 50,000
    images, and never a half-filled folder. Returns the first 64 images, for a grid."""
    outf = os.path.dirname(folder)
    prepare_outf(outf)
    if os.path.isdir(folder) and os.listdir(folder):
        raise Fail(EXIT_OUTPUT, f"{folder} already holds files; choose another --outf")
    clean_stale_temporaries(outf)
    tmp, count, grid = temporary_name(folder), 0, []
    try:
        os.makedirs(tmp)
        for batch in batches:
            for img in batch.permute(0, 2, 3, 1).squeeze(-1).numpy():  # (B, S, S, C), or (B, S, S) for grey
                Image.fromarray(img).save(os.path.join(tmp, f"{count:06d}.png"))
                count += 1
            grid += batch[:64 - len(grid)]
        if hasattr(os, "sync"):
            os.sync()  # every PNG on disk, with one call rather than one fsync per file
        os.replace(tmp, folder)
        fsync_folder(outf)
    except (OSError, RuntimeError) as e:
        remove_quietly(tmp)
        raise Fail(EXIT_OUTPUT, f"could not write the images into {folder}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}; "
                                "free disk space or choose another --outf")
    return torch.stack(grid).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# Devices and processes: one process, or one per GPU (or CPU) under torchrun
# ------------------------------------------------------------------------------------------------

def pick_device(opt, local_rank=0):
    """--cuda / --accel / --device name one; otherwise the best present: CUDA, MPS, XPU, CPU."""
    if opt.cuda or opt.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Fail(EXIT_DEVICE, "--cuda was given but this torch sees no CUDA GPU; drop --cuda to run on the CPU")
        if opt.device.startswith("cuda:"):
            return torch.device(opt.device)
        return torch.device("cuda", local_rank)
    if opt.device:
        try:
            device = torch.device(opt.device)
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise Fail(EXIT_DEVICE, f"--device {opt.device} is not usable here ({str(e).splitlines()[0]})")
        return device
    if opt.accel:
        if torch.accelerator.is_available():
            return torch.device(torch.accelerator.current_accelerator().type, local_rank)
        # as pytorch/examples does: no accelerator is not an error, the CPU runs it
        print("warning: --accel was given but no accelerator is present; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    for kind in ("mps", "xpu"):
        backend = getattr(torch, kind, None) if kind == "xpu" else getattr(torch.backends, kind, None)
        if backend is not None and backend.is_available():
            return torch.device(kind)
    return torch.device("cpu")


class Ranks:
    """Who this process is under torchrun, and the few collectives a run needs besides DDP's
    gradient all-reduce: agreeing on errors, on stopping and on saving, and gathering each rank's
    RNG state. They run over a gloo group on the CPU, so none of them waits for the GPU. With one
    process every method is local and free."""

    def __init__(self, rank=0, world=1, local_rank=0, local_world=1, group=None):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.main, self.group, self.pending = rank == 0, group, None

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error=None):
        """Every rank calls this at the same point. If any rank hit a Fail, every rank raises the
        first one (rank 0 prints it), so no rank is left waiting in a collective or dies with a
        traceback of its own."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        errors = [e for e in self.gather(None if error is None else (error.code, str(error))) if e]
        if errors:
            raise Fail(*errors[0], quiet=not self.main)

    def run(self, fn, *args):
        """fn(*args) on this rank, then agree: its Fail, or any other rank's, ends every rank."""
        try:
            result, error = fn(*args), None
        except Fail as e:
            result, error = None, e
        self.agree(error)
        return result

    def local_first(self, fn):
        """fn() on each node's local rank 0 (a download, the decode into the cache), then on the
        other ranks of the node, which find its result on disk."""
        first = self.run(fn if self.local_rank == 0 else (lambda: None))
        later = self.run(fn if self.local_rank != 0 else (lambda: None))
        return first if self.local_rank == 0 else later

    def flags(self, local):
        """The element-wise max over the ranks of small integer flags (a signal, a save due),
        one step late: the all-reduce posted now is read at the next call, so the step never waits
        for it, and every rank sees the same values at the same step."""
        if self.world == 1:
            return local
        posted = torch.tensor(local, dtype=torch.int64)
        previous, self.pending = self.pending, (posted, dist.all_reduce(
            posted, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        if previous is None:
            return [0] * len(local)
        previous[1].wait()
        return previous[0].tolist()

    def close(self):
        if self.pending is not None:
            self.pending[1].wait()
            self.pending = None


def setup_distributed(opt):
    """Under torchrun (WORLD_SIZE > 1) one DDP process per GPU (or CPU process); else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        device = pick_device(opt)
        if opt.ngpu > 1:
            present = torch.cuda.device_count() if device.type == "cuda" else 0
            if opt.ngpu > present:
                raise Fail(EXIT_DEVICE, f"--ngpu {opt.ngpu} asks for more GPUs than the {present} CUDA GPUs present")
        return device, Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    # CPU tensors go through gloo, CUDA tensors through NCCL. The control group (Ranks) is gloo on
    # the CPU, with a timeout long enough for one node to decode CelebA while the others wait.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    ranks = Ranks(rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                  dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4)))

    def device_of_this_rank():
        if opt.ngpu > 1:
            raise Fail(EXIT_USAGE, "--ngpu is for a single process; under torchrun use --nproc_per_node instead")
        device = pick_device(opt, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device
    return ranks.run(device_of_this_rank), ranks


# ------------------------------------------------------------------------------------------------
# The speed of a step: precision, memory format, compile, CUDA graphs, and G and D wrapped for
# several GPUs. None of it changes what a step computes, only how fast.
# ------------------------------------------------------------------------------------------------

def speed_settings(opt, device, world):
    """Every speed decision in one place; explicit flags win, the defaults follow what was measured
    (README, Performance). Precision: fp32 (TF32 matmuls on CUDA); bf16 was 1.4x faster on an H100
    but learned measurably worse on the synthetic faces (3 seeds of 3), so it is opt-in.
    channels_last: on for CUDA and for fp32 on CPU, off for bf16 on CPU, where the two together
    were reported about 8x slower. CUDA graphs: with one CUDA GPU in one process, and not with
    fp16, whose gradient scaler syncs with the host."""
    amp = "off" if opt.amp == "auto" else opt.amp
    if amp == "fp16" and device.type != "cuda":
        raise Fail(EXIT_USAGE, "--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    channels_last = opt.channels_last
    if channels_last is None:  # (compiled channels-last convolution backward failed on torch 2.11)
        channels_last = (device.type == "cuda" and not opt.compile) or (device.type == "cpu" and dtype is None)
    cuda_graph = (opt.cuda_graphs is not False and device.type == "cuda" and dtype != torch.float16
                  and world == 1 and opt.ngpu == 1)
    return argparse.Namespace(dtype=dtype, channels_last=channels_last, compile=bool(opt.compile), cuda_graph=cuda_graph)


def wrap_for_devices(netG, netD, opt, device, world, use_compile):
    """(g, d, d_for_g): what runs G and D, with DDP under torchrun, DataParallel for --ngpu and
    torch.compile on top. The G step needs D's function but not D's gradients or their all-reduce:
    under DDP it calls the plain D, with D's parameters frozen."""
    g, d = netG, netD
    if world > 1:
        # No buffer sync per forward: D runs forward twice (real, fake) before one backward, and
        # rebroadcasting BatchNorm buffers in between modifies them in place under autograd (the
        # known DDP + BatchNorm trap). Running statistics are not used in training. (Newer torch
        # names the flag forward_sync_buffers; both keep the one sync at the start.)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers": False}
        ids = [device.index] if device.type == "cuda" else None
        g, d = ddp(g, device_ids=ids, **no_sync), ddp(d, device_ids=ids, **no_sync)
    elif opt.ngpu > 1:
        g, d = nn.DataParallel(g, list(range(opt.ngpu))), nn.DataParallel(d, list(range(opt.ngpu)))
    d_for_g = netD if world > 1 else d
    if use_compile:
        g, d = torch.compile(g), torch.compile(d)
        d_for_g = d if d_for_g is not netD else torch.compile(netD)
    return g, d, d_for_g


class Trainer:
    """G, D, their optimizers, and train_step run on this device: eagerly, or captured once and
    replayed as one CUDA graph. `netG`/`netD` are the plain modules (what gets saved); `g`/`d` are
    what runs. Also the averaged G (--ema) and the step's statistics, both kept on the device."""

    def __init__(self, netG, netD, opt, device, speed, world):
        self.netG, self.netD, self.device, self.dtype, self.world = netG, netD, device, speed.dtype, world
        self.nz, self.real_label = opt.nz, opt.real_label
        self.memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
        for net in (netG, netD):
            net.to(device, memory_format=self.memory_format)
        self.g, self.d, self.d_for_g = wrap_for_devices(netG, netD, opt, device, world, speed.compile)
        self.optG = adam(netG.parameters(), opt.lr_g or opt.lr, opt.beta1)
        self.optD = adam(netD.parameters(), opt.lr_d or opt.lr, opt.beta1)
        self.scaler = torch.amp.GradScaler(device.type) if speed.dtype == torch.float16 else None
        # One CUDA graph replays the whole step (both forwards, backwards and Adam updates): at
        # batch 128 a step is hundreds of small kernels, and launching them one by one from
        # Python costs more than running them. Needs the sync-free path: fused Adam, no scaler.
        self.cuda_graph = speed.cuda_graph and self.optD.defaults.get("fused")
        self.graph, self.eager_steps = None, 0
        self.netG_ema = copy.deepcopy(netG).requires_grad_(False).eval() if opt.ema else None
        self.ema_decay = opt.ema
        if self.netG_ema is not None:  # the tensors the average reads and writes, fixed for the run
            self.ema_pairs = [[x for x in net.state_dict().values() if x.is_floating_point()]
                              for net in (self.netG_ema, netG)]
        self.sums, self.count = torch.zeros(5, device=device), 0  # the means of train_step's values
        # Global step of the first non-finite loss or D output (-1: none). Kept on the device and
        # read only at log and save time, so the loop never waits for the GPU.
        self.bad_step = torch.tensor(-1, device=device)
        self.step_t = torch.tensor(0, device=device)  # the global step, counted on the device

    def set_capturable(self):
        """Adam must be told it runs inside a graph; also after loading a state dict."""
        for opt in (self.optG, self.optD):
            for group in opt.param_groups:
                group["capturable"] = bool(self.cuda_graph)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def update(self, opt, loss, finite):
        """Backward and Adam step, skipped on the device when this or an earlier step saw a
        non-finite value; the run then stops at the next log or save, before writing anything.
        Under DDP the ranks first agree on `finite` (an all-reduce on the device, no host sync),
        so a NaN on one rank makes every rank skip, and the replicas stay identical."""
        if self.world > 1:
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = finite.bool()
        first = (self.bad_step < 0) & ~finite
        self.bad_step.copy_(torch.where(first, self.step_t, self.bad_step))
        if self.scaler is not None:  # fp16: the scaler's own inf check decides; update() once a step
            self.scaler.scale(loss).backward()
            if self.bad_step.item() < 0:
                self.scaler.step(opt)
            return
        loss.backward()
        if opt.defaults.get("fused"):
            opt.found_inf = (self.bad_step >= 0).float()
            opt.step()
        elif self.bad_step.item() < 0:
            opt.step()

    def step(self, real_u8, noise_gen):
        """One training iteration on a batch of uint8 images, with this rank's noise."""
        noise = torch.randn(real_u8.shape[0], self.nz, 1, 1, device=self.device, generator=noise_gen)
        self.count += 1
        if self.graph is not None:  # replay the captured step on new inputs
            self.static_real.copy_(real_u8)
            self.static_noise.copy_(noise)
            self.graph.replay()
        elif not self.cuda_graph:
            self.iteration(real_u8, noise)
        elif self.eager_steps < 3:  # warm up on a side stream (cuDNN autotuning, Adam state)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.iteration(real_u8, noise)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.eager_steps += 1
        else:  # capture once; capturing does not run the step, so replay it right away
            self.static_real, self.static_noise = real_u8.clone(), noise.clone()
            self.set_capturable()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may use CUDA while this one captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.iteration(self.static_real, self.static_noise)
            self.graph.replay()

    def iteration(self, real_u8, noise):
        """train_step and what follows it on the device, all of it inside the graph when there is one."""
        values = train_step(self, real_u8, noise)
        if self.scaler is not None and self.bad_step.item() < 0:
            self.scaler.update()  # one scale update per iteration, after both optimizer steps
        if self.netG_ema is not None:
            update_average(*self.ema_pairs, self.step_t, self.ema_decay)
        self.step_t += 1
        with torch.no_grad():
            self.sums += torch.stack(values)

    def read_stats(self):
        """Means since the last call, as floats: the one host sync, at log time."""
        values = (self.sums / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return values

    def sample(self, noise, batch_stats=True):
        """Images from fixed noise, by the averaged G when there is one."""
        with self.autocast():
            return sample(self.netG_ema or self.netG, noise, batch_stats).float()


# ------------------------------------------------------------------------------------------------
# The run: set up, resume, then the loop (a step, maybe a log line, maybe a save, maybe a stop)
# ------------------------------------------------------------------------------------------------

def hms(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_outf(opt, resume_path):
    """A new run never writes over a finished one; a --dry-run writes no checkpoint, so it never
    blocks a later run, nor can one --resume it."""
    if resume_path is None and os.path.exists(os.path.join(opt.outf, "checkpoint.pt")):
        what = "a --dry-run would overwrite its epoch-0 files" if opt.dry_run else "pass --resume to continue it"
        raise Fail(EXIT_OUTPUT, f"--outf {opt.outf} already holds a run (checkpoint.pt); {what}, or choose another --outf")
    prepare_outf(opt.outf)
    clean_stale_temporaries(opt.outf)


class Run:
    """One training run on one rank: its flags, data, networks, position and files. The methods
    follow a run's story: set up, load the data, start (or resume), then the loop, in which each
    iteration is a step, maybe a log line, maybe a save, maybe a stop. Rank 0 alone writes files;
    every other decision is taken by all ranks together."""

    def __init__(self, opt, device, ranks):
        """Everything that may find a mistake in the flags, files or data, before any collective
        but Ranks' own: train() runs it on every rank and the ranks agree on the outcome."""
        self.opt, self.device, self.ranks = opt, device, ranks
        self.log = print if ranks.main else (lambda *a, **k: None)
        self.warn = (lambda m: print(f"warning: {m}", file=sys.stderr)) if ranks.local_rank == 0 else (lambda m: None)
        self.speed = speed_settings(opt, device, ranks.world)
        self.ckpt_path = os.path.join(opt.outf, "checkpoint.pt")
        self.resume_path = (opt.resume or self.ckpt_path) if opt.resume is not None else None
        if ranks.main:
            check_outf(opt, self.resume_path)
        self.dataset, self.nc, self.key = build_dataset(opt, ranks)
        self.config = {k: v for k, v in vars(opt).items() if isinstance(v, (int, float, str, bool, type(None)))}
        self.config.update(nc=self.nc, world=ranks.world)
        self.ckpt = read_checkpoint(self.resume_path, self.config) if self.resume_path is not None else None
        torch.manual_seed(opt.manualSeed)
        random.seed(opt.manualSeed)
        self.netG = Generator(opt.nz, opt.ngf, self.nc, opt.imageSize)
        self.netD = Discriminator(self.nc, opt.ndf, opt.imageSize)
        self.netG.apply(weights_init)
        self.netD.apply(weights_init)
        if opt.netG:
            load_weights(self.netG, opt.netG, "--netG")
        if opt.netD:
            load_weights(self.netD, opt.netD, "--netD")
        self.fixed_noise = torch.randn(64, opt.nz, 1, 1)
        self.noise_gen = torch.Generator(device).manual_seed(opt.manualSeed + ranks.rank)  # per-rank noise
        self.history = {k: [] for k in LOG_FIELDS}
        self.epoch = self.it = self.step = 0
        self.last_good = None
        self.d_wins_since, self.warned = None, set()

    def load_data(self):
        opt = self.opt
        self.data = load_data(opt, self.dataset, self.key, self.nc, self.device, self.ranks, self.log, self.warn)
        if len(self.data) < opt.batchSize * self.ranks.world:
            world = self.ranks.world
            raise Fail(EXIT_DATA, f"the data set has {len(self.data)} images, fewer than one batch of --batchSize "
                                  f"{opt.batchSize}{f' x {world} processes' if world > 1 else ''}; lower --batchSize")
        self.batches = Batches(self.data, opt.batchSize, opt.manualSeed, self.ranks.rank, self.ranks.world,
                               opt.workers, self.device)

    def start(self):
        """The trainer (DDP wraps the networks here), the state of a resumed run, the first files."""
        opt, ranks, speed = self.opt, self.ranks, self.speed
        self.tr = Trainer(self.netG, self.netD, opt, self.device, speed, ranks.world)
        if self.ckpt is not None:
            self.resume(self.ckpt)
            self.ckpt = None  # free it
        self.fixed_noise = self.fixed_noise.to(self.device)
        self.total = 1 if opt.dry_run else opt.niter * self.batches.per_epoch
        if opt.max_steps:
            self.total = min(self.total, self.step + opt.max_steps)
        self.tr.step_t.fill_(self.step)
        self.on_main(self.first_files)
        real = next(Batches(self.data, min(64, len(self.data)), opt.manualSeed, 0, 1, 0, torch.device("cpu")).epoch(0, 0))
        self.real_spread = (real.float() / 127.5 - 1).std(0).mean().item()  # per-pixel spread of the data
        data = self.data
        self.log(f"{opt.dataset}: {len(data)} images of {self.nc}x{opt.imageSize}x{opt.imageSize}, "
                 f"{'decoded once, in ' + str(data.device) + ' memory' if isinstance(data, torch.Tensor) else f'decoded each epoch by {opt.workers} workers'}"
                 "; "
                 f"device {self.device}, {ranks.world} process(es), global batch {opt.batchSize * ranks.world}, "
                 f"precision {str(speed.dtype).replace('torch.', '') if speed.dtype else 'fp32'}, "
                 f"channels_last {speed.channels_last}, compile {speed.compile}, CUDA graph {self.tr.cuda_graph}")

    def resume(self, ckpt):
        """Networks, optimizers, the averaged G, the scaler, this rank's RNG states, the position."""
        tr = self.tr
        for module, key in ((self.netG, "netG"), (self.netD, "netD"), (tr.optG, "optG"), (tr.optD, "optD")):
            module.load_state_dict(ckpt[key])
        if tr.netG_ema is not None:  # (a run that starts averaging on resume starts from G)
            tr.netG_ema.load_state_dict(ckpt.get("netG_ema", self.netG.state_dict()))
        tr.set_capturable()
        if tr.scaler and ckpt["scaler"]:
            tr.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, self.noise_gen, self.ranks.rank)
        self.fixed_noise, self.history = ckpt["fixed_noise"], ckpt["history"]
        self.history.setdefault("warning", [""] * len(self.history["step"]))  # (older checkpoints)
        self.epoch, self.it, self.step = ckpt["epoch"], ckpt["iter"], ckpt["step"]
        self.last_good = self.resume_path
        self.log(f"resumed from {self.resume_path} at epoch {self.epoch}, iteration {self.it} (step {self.step})")

    def first_files(self):
        """A grid of training images and a fresh losses.csv for a new run; after a resume,
        losses.csv as of the checkpoint."""
        if self.resume_path is None:
            real = next(Batches(self.data, min(64, len(self.data) // self.ranks.world), self.opt.manualSeed, 0, 1, 0,
                                torch.device("cpu")).epoch(0, 0))
            save_grid(real.float() / 127.5 - 1, os.path.join(self.opt.outf, "real_samples.png"))
        start_losses(self.opt.outf, self.history)

    def on_main(self, write, *args):
        """write(*args) on rank 0, which alone writes files; every rank learns whether it failed."""
        error = None
        if self.ranks.main:
            try:
                write(*args)
            except Fail as e:
                error = e
        self.ranks.agree(error)

    def loop(self):
        """Each iteration: a training step, maybe a log line, maybe a save, maybe a stop.
        SIGINT / SIGTERM (how clusters pre-empt jobs) finish the step, save and exit 128 + signal;
        under torchrun the ranks agree on it one step later, whichever rank got the signal."""
        opt, tr, per_epoch = self.opt, self.tr, self.batches.per_epoch
        self.signals = []
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.last_save = self.tick = time.monotonic()
        self.tick_step = start_step = self.step
        try:
            while True:
                batches, first, epoch_start = self.batches.epoch(self.epoch, self.it), self.it, time.monotonic()
                while self.it < per_epoch and self.step < self.total:
                    tr.step(next(batches), self.noise_gen)
                    self.step, self.it = self.step + 1, self.it + 1
                    if self.it % opt.log_every == 0 or self.it == per_epoch or self.step == self.total:
                        self.log_progress()
                    minutes_due = bool(opt.save_minutes) and time.monotonic() - self.last_save > 60 * opt.save_minutes
                    signum, late_save = self.ranks.flags([self.signals[0] if self.signals else 0, int(minutes_due)])
                    if signum:
                        self.save()
                        self.log(f"stopped by signal {signum} at epoch {self.epoch}, iteration {self.it}; "
                                 f"continue with --resume (checkpoint {self.ckpt_path})", flush=True)
                        return 128 + signum
                    if late_save or (opt.save_every and self.step % opt.save_every == 0):
                        self.save()
                if self.it < per_epoch and not opt.dry_run:  # stopped by --max-steps
                    self.verify_ranks()
                    self.save()
                    self.log(f"stopped after {self.step - start_step} iterations (--max-steps); checkpoint {self.ckpt_path}")
                    return 0
                self.end_epoch(self.it - first, time.monotonic() - epoch_start)
                if opt.dry_run or self.step >= self.total or self.epoch >= opt.niter:
                    self.log(f"done: {self.step} iterations; samples, weights{'' if opt.dry_run else ' and checkpoint'} in {opt.outf}")
                    return 0
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.ranks.close()

    def on_signal(self, signum, frame):
        self.signals.append(signum)  # acted on after the step, once the ranks agree

    def log_progress(self):
        """The log line (means since the last one: the one host sync), losses.csv, and the stop
        on a non-finite loss."""
        opt, world, per_epoch = self.opt, self.ranks.world, self.batches.per_epoch
        loss_d, loss_g, d_x, d_g_z1, d_g_z2 = self.tr.read_stats()
        self.check_finite()
        now = time.monotonic()
        rate = (self.step - self.tick_step) * opt.batchSize * world / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, self.step
        self.log(f"[{self.epoch}/{opt.niter}][{self.it}/{per_epoch}] Loss_D: {loss_d:.4f} Loss_G: {loss_g:.4f} "
                 f"D(x): {d_x:.4f} D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f} | {rate:.0f} img/s | "
                 f"left: epoch {hms((per_epoch - self.it) * opt.batchSize * world / rate)} "
                 f"run {hms((self.total - self.step) * opt.batchSize * world / rate)}", flush=True)
        warning = self.watch_for_collapse(d_g_z1, loss_g) if self.ranks.main else ""
        row = (self.epoch, self.it, self.step, loss_d, loss_g, d_x, d_g_z1, d_g_z2, rate, warning)
        for k, v in zip(LOG_FIELDS, row):
            self.history[k].append(v)
        if self.ranks.main:
            append_losses(opt.outf, row)

    def watch_for_collapse(self, d_g_z, loss_g, stretch=200):
        """The two ways a DCGAN run fails while its losses stay finite, each said once, with what to
        try, and named in losses.csv: D wins outright (D(G(z)) below 0.01 for `stretch` iterations,
        so G's gradient has all but vanished), or the fixed-noise samples stop varying (their
        per-pixel spread below a tenth of the data's: mode collapse). Checked from iteration 200."""
        self.d_wins_since = (self.d_wins_since if self.d_wins_since is not None else self.step) if d_g_z < 0.01 else None
        kinds = []
        if self.d_wins_since is not None and self.step - self.d_wins_since >= stretch:
            kinds.append(("d_wins", f"D has rejected nearly every fake for {self.step - self.d_wins_since} iterations "
                                    f"(D(G(z)) {d_g_z:.4f}, Loss_G {loss_g:.2f}): G has stopped learning"))
        if self.step >= 200:
            spread = sample(self.tr.netG_ema or self.netG, self.fixed_noise, self.opt.sample_bn == "batch").float().std(0).mean().item()
            if spread < 0.1 * self.real_spread:
                kinds.append(("collapsed", f"the samples from the fixed noise have stopped varying (per-pixel spread "
                                           f"{spread:.3f}, the data's {self.real_spread:.3f}): mode collapse"))
        for kind, what in kinds:
            if kind not in self.warned:
                self.warned.add(kind)
                print(f"warning: iteration {self.step} (epoch {self.epoch}): {what}; try a lower --lr, "
                      f"another --manualSeed, or --resume from an earlier checkpoint copy", file=sys.stderr, flush=True)
        return "+".join(kind for kind, _ in kinds)

    def check_finite(self, state=None):
        """Stop on the first non-finite loss or D output (the ranks agreed on it in the step);
        before a save, also refuse a state holding inf or NaN anywhere."""
        bad, per_epoch = self.tr.bad_step.item(), self.batches.per_epoch
        where = f"a non-finite loss or D output at epoch {bad // per_epoch}, iteration {bad % per_epoch} (step {bad})"
        if bad < 0 and state is not None:
            if not all(bool(torch.isfinite(t).all()) for t in tensors_in(state) if t.is_floating_point()):
                bad, where = self.step, f"non-finite weights or optimizer state at epoch {self.epoch}, step {self.step}"
        if bad >= 0:
            raise Fail(EXIT_DIVERGED, f"training diverged: {where}; nothing after it was saved; "
                                      f"last good checkpoint: {self.last_good or 'none yet'}; try a lower --lr",
                       quiet=not self.ranks.main)

    def save(self, finished_epoch=None):
        """checkpoint.pt (and, when an epoch has finished, its files) on rank 0; all ranks take part."""
        ckpt = make_checkpoint(self.tr, self.epoch, self.it, self.step, self.fixed_noise, self.config,
                               self.history, self.noise_gen, self.ranks)
        self.check_finite(ckpt)
        self.on_main(self.write_files, ckpt, finished_epoch)
        self.last_good = None if self.opt.dry_run else self.ckpt_path
        self.last_save = time.monotonic()

    def write_files(self, ckpt, finished_epoch):
        """An epoch's sample grid from the fixed noise, its weights and the loss plot, then the checkpoint."""
        opt, tr = self.opt, self.tr
        if finished_epoch is not None:
            save_grid(tr.sample(self.fixed_noise, opt.sample_bn == "batch"),
                      os.path.join(opt.outf, f"fake_samples_epoch_{finished_epoch:03d}.png"))
            nets = {"netG": tr.netG, "netG_ema": tr.netG_ema, "netD": tr.netD}
            for name, net in nets.items():
                if net is not None:
                    atomic_save(net.state_dict(), os.path.join(opt.outf, f"{name}_epoch_{finished_epoch}.pth"))
            plot_losses(opt.outf, self.history)
        if not opt.dry_run:
            atomic_save(ckpt, self.ckpt_path)

    def end_epoch(self, iterations, seconds):
        """The epoch's line, the ranks' agreement check, its files and the checkpoint."""
        epoch = self.epoch
        self.log(f"epoch {epoch} done: {iterations} iterations in {seconds:.1f} s "
                 f"({iterations * self.opt.batchSize * self.ranks.world / max(seconds, 1e-9):.0f} img/s)")
        self.verify_ranks()
        if self.it == self.batches.per_epoch:
            self.epoch, self.it = epoch + 1, 0
        self.save(finished_epoch=epoch)

    def verify_ranks(self):
        """DDP keeps the replicas identical; check it where every rank arrives (epoch end, stop)."""
        if self.ranks.world > 1:
            flat = torch.cat([p.detach().float().flatten().cpu() for p in list(self.netG.parameters()) + list(self.netD.parameters())])
            digests = self.ranks.gather(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
            self.log(f"ranks agree: G and D weights identical on {self.ranks.world} processes" if len(set(digests)) == 1
                     else f"warning: G and D weights differ between the {self.ranks.world} processes")


def train(opt, device, ranks):
    """Set up (a mistake in the flags, files or data on any rank ends every rank with one line),
    load the data, start or resume, loop."""
    run = ranks.run(Run, opt, device, ranks)
    ranks.run(run.load_data)
    run.start()
    return run.loop()


# ------------------------------------------------------------------------------------------------
# The command line: the flags, the commands that make images without training, main
# ------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise Fail(EXIT_USAGE, f"{message} (see --help)")


def build_parser():
    p = Parser(description="Train a DCGAN (Radford et al. 2015) or generate images from a trained one.")
    add_example_flags(p.add_argument)
    add_own_flags(p.add_argument)
    return p


def add_example_flags(a):
    """The flags of pytorch/examples dcgan/main.py, same names and meanings, so its command lines work here."""
    a("--dataset", default="celeba",
      choices=["celeba", "folder", "imagenet", "lfw", "cifar10", "mnist", "lsun", "fake", "synthetic"],
      help="data set; imagenet and lfw are folder data sets, synthetic needs no download (default: %(default)s)")
    a("--dataroot", help="path to the data set (not needed for fake and synthetic)")
    a("--workers", type=int, default=2, help="data loading worker processes (default: %(default)s)")
    a("--batchSize", type=int, default=128, help="batch size per process (default: %(default)s)")
    a("--imageSize", type=int, default=64, help="image height and width: a power of two, 16 to 256 (default: %(default)s)")
    a("--nz", type=int, default=100, help="size of the latent z vector (default: %(default)s)")
    a("--ngf", type=int, default=64, help="generator width (default: %(default)s)")
    a("--ndf", type=int, default=64, help="discriminator width (default: %(default)s)")
    a("--niter", type=int, default=25, help="number of epochs to train for (default: %(default)s)")
    a("--lr", type=float, default=0.0002, help="Adam learning rate (default: %(default)s)")
    a("--beta1", type=float, default=0.5, help="Adam beta1 (default: %(default)s)")
    a("--dry-run", action="store_true", help="run a single training iteration, then save and exit")
    a("--ngpu", type=int, default=1, help="number of GPUs to use through nn.DataParallel (default: %(default)s)")
    a("--netG", default="", help="generator weights to start from (or to --generate with)")
    a("--netD", default="", help="discriminator weights to start from")
    a("--outf", default="out", help="folder for samples, weights, checkpoint and logs (default: %(default)s)")
    a("--manualSeed", type=int, default=999, help="seed for weights, data order and noise (default: %(default)s)")
    a("--classes", default="bedroom", help="comma-separated LSUN classes (default: %(default)s)")
    a("--accel", action="store_true", help="use the current accelerator (torch.accelerator)")
    a("--cuda", action="store_true", help="use CUDA")


def add_own_flags(a):
    a("--device", default="", help="device to use, e.g. cpu, cuda, cuda:1, mps, xpu (default: best present)")
    a("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
      help="mixed precision; auto is fp32, which learned best (default: %(default)s)")
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile G and D")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
      help="replay each training step as one CUDA graph (default: on with one CUDA GPU)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="channels-last memory format (default: chosen per device and precision)")
    a("--preload", action=argparse.BooleanOptionalAction, default=None,
      help="decode the data set once into a uint8 tensor (default: when it fits in memory)")
    a("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dcgan"),
      help="where decoded data sets are cached between runs, '' for none (default: %(default)s)")
    a("--lr-d", type=float, default=0.0, help="D's Adam learning rate, if not --lr")
    a("--lr-g", type=float, default=0.0, help="G's Adam learning rate, if not --lr")
    a("--real-label", type=float, default=1.0,
      help="D's target for real images; 0.9 is one-sided label smoothing (default: %(default)s)")
    a("--ema", type=float, default=0.0, metavar="DECAY",
      help="also keep an exponential moving average of G's weights with this decay (e.g. 0.999), warmed up "
           "over the first steps; samples, --generate and netG_ema_epoch_N.pth use it (default: off)")
    a("--sample-bn", default="batch", choices=["batch", "eval"],
      help="BatchNorm when sampling: batch (each batch's own statistics, as in training) or eval (running "
           "statistics) (default: %(default)s)")
    a("--log-every", type=int, default=50, help="log every N iterations (default: %(default)s)")
    a("--save-every", type=int, default=0, help="also save the checkpoint every N iterations (0: off)")
    a("--save-minutes", type=float, default=10.0, help="also save the checkpoint every N minutes, 0 for never (default: %(default)s)")
    a("--max-steps", type=int, default=0, help="stop (and save) after N iterations in this run (0: no limit)")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue from a checkpoint (default PATH: OUTF/checkpoint.pt)")
    a("--generate", type=int, default=0, metavar="N",
      help="write N images from --netG into OUTF/generated/ and exit")
    a("--interpolate", type=int, default=0, metavar="N",
      help="write OUTF/interpolation.png from --netG: N rows, each a walk between two random z, and exit")
    a("--export-real", type=int, default=0, metavar="N",
      help="write N training images, cropped and resized as G sees them, into OUTF/real/ and exit (for FID)")


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    checks = [
        (opt.batchSize >= 1, "--batchSize must be at least 1"),
        (opt.imageSize in (16, 32, 64, 128, 256), "--imageSize must be 16, 32, 64, 128 or 256"),
        (opt.nz >= 1 and opt.ngf >= 1 and opt.ndf >= 1, "--nz, --ngf and --ndf must be at least 1"),
        (opt.niter >= 1, "--niter must be at least 1"),
        (opt.workers >= 0, "--workers must be 0 or more"),
        (all(math.isfinite(lr) and lr > 0 for lr in (opt.lr, opt.lr_d or 1, opt.lr_g or 1)),
         "--lr, --lr-d and --lr-g must be positive numbers"),
        (0.5 < opt.real_label <= 1, "--real-label must be in (0.5, 1]: 1, or 0.9 for one-sided label smoothing"),
        (0 <= opt.beta1 < 1, "--beta1 must be in [0, 1)"),
        (0 <= opt.ema < 1, "--ema must be in [0, 1): 0 for off, or a decay such as 0.999"),
        (opt.ngpu >= 1, "--ngpu must be at least 1"),
        (opt.log_every >= 1, "--log-every must be at least 1"),
        (opt.save_every >= 0 and opt.max_steps >= 0, "--save-every and --max-steps must be 0 or more"),
        (opt.save_minutes >= 0, "--save-minutes must be 0 or more"),
        (opt.generate >= 0 and opt.interpolate >= 0 and opt.export_real >= 0,
         "--generate, --interpolate and --export-real must be 0 or more"),
        (not ((opt.generate or opt.interpolate) and not opt.netG),
         "--generate and --interpolate need --netG PATH (weights or a checkpoint)"),
        (opt.manualSeed >= 0, "--manualSeed must be 0 or more"),
        (not (opt.dry_run and opt.resume is not None), "--dry-run writes no checkpoint and cannot --resume one; drop one of them"),
    ]
    for ok, message in checks:
        if not ok:
            raise Fail(EXIT_USAGE, message)
    if opt.dataset in ("imagenet", "lfw"):
        opt.dataset = "folder"
    if opt.dataroot is None and opt.dataset not in ("fake", "synthetic") and not (opt.generate or opt.interpolate):
        raise Fail(EXIT_USAGE, f"--dataroot is required for --dataset {opt.dataset} "
                               "(or use --dataset synthetic, which needs no download)")
    return opt

def generate(opt, device):
    """--generate N: N separate PNGs (what FID tools read) and one grid, from --netG."""
    netG = load_generator(opt).to(device)
    g = torch.Generator(device).manual_seed(opt.manualSeed)
    nz = netG.main[0].in_channels

    def batches():
        with torch.no_grad():
            for start in range(0, opt.generate, 256):  # whole batches, so the last one's statistics are too
                z = torch.randn(256, nz, 1, 1, device=device, generator=g)
                yield to_pixels(sample(netG, z, opt.sample_bn == "batch")[:opt.generate - start].float().cpu())
    folder = os.path.join(opt.outf, "generated")
    grid = write_png_folder(folder, batches())
    save_grid(grid, os.path.join(opt.outf, "generated_grid.png"))
    print(f"wrote {opt.generate} images of {grid.shape[-1]}x{grid.shape[-1]} to {folder}/ and a grid to "
          f"{os.path.join(opt.outf, 'generated_grid.png')}")
    return 0


def interpolate(opt, device, steps=10):
    """--interpolate N: N rows of `steps` images, each row G along the arc between two random z."""
    netG = load_generator(opt).to(device)
    z = latent_walks(opt.interpolate, steps, netG.main[0].in_channels, torch.Generator(device).manual_seed(opt.manualSeed))
    images = sample(netG, z, opt.sample_bn == "batch").float().cpu()  # (N * steps, nc, S, S)
    prepare_outf(opt.outf)
    path = os.path.join(opt.outf, "interpolation.png")
    atomic_write(path, lambda f: vutils.save_image(images, f, format="png", nrow=steps, normalize=True, value_range=(-1, 1)))
    print(f"wrote {opt.interpolate} latent walks of {steps} steps to {path}")
    return 0


def export_real(opt):
    """--export-real N: N training images as PNGs, exactly as the networks see them (same crop and
    resize), a seeded random sample: the real side of an FID that compares like with like."""
    dataset, nc, _ = build_dataset(opt, Ranks())
    n = min(opt.export_real, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(opt.manualSeed))[:n].tolist()

    def batches():
        if isinstance(dataset, torch.Tensor):
            for i in range(0, n, 256):
                yield dataset[order[i:i + 256]]
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=256, sampler=order, num_workers=opt.workers)
            yield from loader
    folder = os.path.join(opt.outf, "real")
    write_png_folder(folder, batches())
    print(f"wrote {n} training images of {opt.imageSize}x{opt.imageSize} to {folder}/")
    return 0

def main(argv=None):
    """Runs the command line; returns the exit code (0 on success). Errors in the user's input
    print one line to stderr (under torchrun from rank 0 alone) and return a code from the table
    in README."""
    try:
        try:
            opt = parse_args(argv)
        except Fail as e:  # every rank sees the same mistake in the flags
            raise Fail(e.code, str(e), quiet=os.environ.get("RANK", "0") != "0")
        device, ranks = setup_distributed(opt)
        try:
            if opt.generate or opt.interpolate or opt.export_real:  # one process does these
                if not ranks.main:
                    return 0
                return generate(opt, device) if opt.generate else interpolate(opt, device) if opt.interpolate \
                    else export_real(opt)
            return train(opt, device, ranks)
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

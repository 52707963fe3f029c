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

The file reads top to bottom: configuration, device and distributed setup, data, models, the
training step, checkpoints and samples, main. Import it to use the pieces: nothing runs on import.
"""
import argparse
import glob
import hashlib
import math
import os
import random
import signal
import sys
import time
import warnings

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

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"dcgan.py: error: {message} (see --help)\n")


def build_parser():
    p = Parser(description="Train a DCGAN (Radford et al. 2015) or generate images from a trained one.")
    a = p.add_argument
    # The flags of pytorch/examples dcgan/main.py, same names and meanings.
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
    # Additions.
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
    a("--log-every", type=int, default=50, help="log every N iterations (default: %(default)s)")
    a("--save-every", type=int, default=0, help="also save the checkpoint every N iterations (0: off)")
    a("--save-minutes", type=float, default=10.0, help="also save the checkpoint every N minutes, 0 for never (default: %(default)s)")
    a("--max-steps", type=int, default=0, help="stop (and save) after N iterations in total (0: no limit)")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue from a checkpoint (default PATH: OUTF/checkpoint.pt)")
    a("--generate", type=int, default=0, metavar="N",
      help="write N images from --netG into OUTF/generated/ and exit")
    return p


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    checks = [
        (opt.batchSize >= 1, "--batchSize must be at least 1"),
        (opt.imageSize in (16, 32, 64, 128, 256), "--imageSize must be 16, 32, 64, 128 or 256"),
        (opt.nz >= 1 and opt.ngf >= 1 and opt.ndf >= 1, "--nz, --ngf and --ndf must be at least 1"),
        (opt.niter >= 1, "--niter must be at least 1"),
        (opt.workers >= 0, "--workers must be 0 or more"),
        (math.isfinite(opt.lr) and opt.lr > 0, "--lr must be a positive number"),
        (0 <= opt.beta1 < 1, "--beta1 must be in [0, 1)"),
        (opt.ngpu >= 1, "--ngpu must be at least 1"),
        (opt.log_every >= 1, "--log-every must be at least 1"),
        (opt.save_every >= 0 and opt.max_steps >= 0, "--save-every and --max-steps must be 0 or more"),
        (opt.save_minutes >= 0, "--save-minutes must be 0 or more"),
        (opt.generate >= 0, "--generate must be 0 or more"),
        (not (opt.generate and not opt.netG), "--generate needs --netG PATH (weights or a checkpoint)"),
        (opt.manualSeed >= 0, "--manualSeed must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise Fail(EXIT_USAGE, message)
    if opt.dataset in ("imagenet", "lfw"):
        opt.dataset = "folder"
    if opt.dataroot is None and opt.dataset not in ("fake", "synthetic") and not opt.generate:
        raise Fail(EXIT_USAGE, f"--dataroot is required for --dataset {opt.dataset} "
                               "(or use --dataset synthetic, which needs no download)")
    return opt


# ------------------------------------------------------------------------------------------------
# Device and distributed setup
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
        if not torch.accelerator.is_available():
            raise Fail(EXIT_DEVICE, "--accel was given but no accelerator is present; drop --accel to run on the CPU")
        return torch.device(torch.accelerator.current_accelerator().type, local_rank)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    for kind in ("mps", "xpu"):
        backend = getattr(torch, kind, None) if kind == "xpu" else getattr(torch.backends, kind, None)
        if backend is not None and backend.is_available():
            return torch.device(kind)
    return torch.device("cpu")


def setup_distributed(opt):
    """Under torchrun (RANK set) start one DDP process per GPU; else a single process."""
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), 0
    if "RANK" in os.environ and world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(opt, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if opt.ngpu > 1:
            raise Fail(EXIT_USAGE, "--ngpu is for a single process; under torchrun use --nproc_per_node instead")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
        return device, rank, world
    device = pick_device(opt)
    if opt.ngpu > 1:
        present = torch.cuda.device_count() if device.type == "cuda" else 0
        if opt.ngpu > present:
            raise Fail(EXIT_DEVICE, f"--ngpu {opt.ngpu} asks for more GPUs than the {present} CUDA GPUs present")
    return device, 0, 1


def choose_speed_settings(opt, device):
    """amp dtype, channels_last, compile and CUDA graphs: explicit flags win; the defaults follow
    what was measured (README, Performance). Precision: fp32 (TF32 matmuls on CUDA). bf16 was
    1.4x faster on an H100 but learned measurably worse on the synthetic faces (3 seeds of 3),
    so it is opt-in. channels_last: on for CUDA and for fp32 on CPU, off for bf16 on CPU, where
    the two together were reported about 8x slower. CUDA graphs: on with one CUDA GPU."""
    amp = "off" if opt.amp == "auto" else opt.amp
    if amp == "fp16" and device.type != "cuda":
        raise Fail(EXIT_USAGE, "--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    use_compile = bool(opt.compile)
    channels_last = opt.channels_last
    if channels_last is None:  # (compiled channels-last convolution backward failed on torch 2.11)
        channels_last = (device.type == "cuda" and not use_compile) or (device.type == "cpu" and dtype is None)
    cuda_graph = opt.cuda_graphs if opt.cuda_graphs is not None else device.type == "cuda"
    return dtype, channels_last, use_compile, cuda_graph


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


def image_transform(dataset, size):
    """uint8 tensor in, (C, size, size) uint8 out.
    CelebA: img_align_celeba is 178x218 with the face in the middle. We take the centre 108x108
    square (the face crop of the original DCGAN CelebA setups) and resize it, so the 64x64 pixels
    go to the face rather than to hair and background, which a resize + centre crop of the whole
    picture keeps. Other data sets: resize the short side, then centre crop, as pytorch/examples."""
    steps = [v2.CenterCrop(108)] if dataset == "celeba" else []
    return v2.Compose(steps + [v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def decode_image(path, nc):
    """uint8 (nc, H, W) from any image file PIL reads, whatever its mode (grey, palette, RGBA,
    CMYK, 16-bit); None when the file is missing, truncated or not an image."""
    try:
        with Image.open(path) as im:
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


def build_dataset(opt):
    """Returns (dataset of uint8 images, number of channels, cache key or None)."""
    size, kind, root = opt.imageSize, opt.dataset, opt.dataroot
    if kind == "synthetic":
        return synthetic_faces(8192, size, 3, seed=opt.manualSeed), 3, None
    if kind == "fake":
        g = torch.Generator().manual_seed(opt.manualSeed)
        return torch.randint(0, 256, (1024, 3, size, size), generator=g, dtype=torch.uint8), 3, None
    if not os.path.isdir(root):
        raise Fail(EXIT_DATA, f"--dataroot {root} is not a folder; give the folder that holds the {kind} images")
    if kind in ("celeba", "folder"):
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
    nc = 1 if kind == "mnist" else 3
    try:
        if kind == "cifar10":
            base = torchvision.datasets.CIFAR10(root=root, download=True)
        elif kind == "mnist":
            base = torchvision.datasets.MNIST(root=root, download=True)
        else:
            base = torchvision.datasets.LSUN(root=root, classes=[c + "_train" for c in opt.classes.split(",")])
    except Exception as e:
        raise Fail(EXIT_DATA, f"could not open {kind} in --dataroot {root}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              "download it there (see README)")
    key = f"{cache_prefix(opt, root)}-{hashlib.sha1(f'{opt.classes} {len(base)}'.encode()).hexdigest()[:16]}"
    return TorchvisionImages(base, image_transform(kind, size)), nc, key


def decode_all(dataset, workers, log):
    """One pass over the data set into a single uint8 tensor, showing progress. Unreadable images
    are skipped, counted and named; more than 1% of them stops the run."""
    source = dataset
    if isinstance(dataset, ImageFiles):
        source = ImageFiles(dataset.paths, dataset.nc, dataset.transform, substitute=False)
    loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=workers, collate_fn=stack_readable)
    images, bad, done, last = [], [], 0, time.monotonic()
    for chunk, unreadable in loader:
        images += [] if chunk is None else [chunk]
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
    if not images:
        raise Fail(EXIT_DATA, "no readable images in --dataroot")
    return torch.cat(images)


def stack_readable(items):
    """Collate for the decode pass: one tensor of the readable images (one shared-memory block
    per batch, not one per image) and the positions of the unreadable ones."""
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), [i for i, x in enumerate(items) if x is None]


def preload(opt, dataset, key, device, rank, log):
    """The whole data set as one uint8 tensor, decoded once and cached in --cache-dir, kept on the
    GPU when it fits in a quarter of its memory."""
    if isinstance(dataset, torch.Tensor):
        data = dataset
    else:
        path = os.path.join(opt.cache_dir, key + ".pt") if opt.cache_dir and key else ""
        data = None
        if path and rank != 0 and dist.is_initialized():
            dist.barrier()  # rank 0 decodes and writes the cache first
        if path and os.path.exists(path):
            try:
                data = torch.load(path, weights_only=True, mmap=True)
                log(f"data set: {len(data)} images from cache {path}")
            except Exception:
                print(f"warning: ignoring unreadable cache {path}", file=sys.stderr)
        if data is None:
            data = decode_all(dataset, opt.workers, log)
            if path and rank == 0:
                try:
                    os.makedirs(opt.cache_dir, exist_ok=True)
                    clean_stale_temporaries(opt.cache_dir)
                    for old in glob.glob(os.path.join(opt.cache_dir, key.rsplit("-", 1)[0] + "-*.pt")):
                        os.remove(old)  # an older decode of the same folder at the same size
                    atomic_save(data, path)
                    log(f"cached the decoded data set in {path}")
                except (OSError, Fail) as e:
                    print(f"warning: could not cache the decoded data set in --cache-dir {opt.cache_dir} ({e})", file=sys.stderr)
        if path and rank == 0 and dist.is_initialized():
            dist.barrier()
    if device.type == "cuda" and data.numel() < torch.cuda.get_device_properties(device).total_memory // 4:
        return data.to(device)
    return data.contiguous()


def should_preload(opt, dataset, nc):
    if opt.preload is not None:
        return opt.preload
    if isinstance(dataset, torch.Tensor):
        return True
    nbytes = len(dataset) * nc * opt.imageSize ** 2
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return nbytes < memory // 4


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
# Models (paper section 3): all-convolutional, BatchNorm, ReLU in G with Tanh at the output,
# LeakyReLU(0.2) in D, no pooling and no fully connected hidden layers. The number of blocks
# follows log2(image size); at 64x64 both equal pytorch/examples layer for layer, state-dict keys
# included (main.0.weight, ...), so its .pth files load here.
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


# ------------------------------------------------------------------------------------------------
# Training step (paper, algorithm 1 of Goodfellow et al. 2014, with k = 1)
# ------------------------------------------------------------------------------------------------

class Trainer:
    """Holds G, D, their optimizers and the per-step logic. `netG`/`netD` are the plain modules
    (what gets saved); `g`/`d` are what runs: DataParallel / DDP / compiled wrappers of them."""

    def __init__(self, netG, netD, opt, device, dtype, channels_last, use_compile, world, cuda_graph=False):
        self.netG, self.netD, self.device, self.dtype = netG, netD, device, dtype
        self.nz = opt.nz
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for net in (netG, netD):
            net.to(device, memory_format=self.memory_format)
        g, d = netG, netD
        if world > 1:
            # broadcast_buffers=False: D runs forward twice (real, fake) before one backward;
            # rebroadcasting BatchNorm buffers in between modifies them in place under autograd
            # (the known DDP + BatchNorm trap). Running statistics are not used in training.
            ids = [device.index] if device.type == "cuda" else None
            g = nn.parallel.DistributedDataParallel(g, device_ids=ids, broadcast_buffers=False)
            d = nn.parallel.DistributedDataParallel(d, device_ids=ids, broadcast_buffers=False)
        elif opt.ngpu > 1:
            g = nn.DataParallel(g, list(range(opt.ngpu)))
            d = nn.DataParallel(d, list(range(opt.ngpu)))
        # The G step needs D's function but not D's gradients or their all-reduce: under DDP it
        # calls the plain D, with D's parameters frozen.
        d_for_g = netD if world > 1 else d
        if use_compile:
            g, d = torch.compile(g), torch.compile(d)
            d_for_g = d if d_for_g is not netD else torch.compile(netD)
        self.g, self.d, self.d_for_g = g, d, d_for_g
        # Adam with the paper's lr and beta1 (section 4). The fused kernel updates all tensors in
        # one launch and can skip an update on the device, without a host sync (see update()).
        betas = (opt.beta1, 0.999)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        try:
            self.optG = torch.optim.Adam(netG.parameters(), lr=opt.lr, betas=betas, fused=True)
            self.optD = torch.optim.Adam(netD.parameters(), lr=opt.lr, betas=betas, fused=True)
        except RuntimeError:  # a device without a fused Adam
            self.optG = torch.optim.Adam(netG.parameters(), lr=opt.lr, betas=betas)
            self.optD = torch.optim.Adam(netD.parameters(), lr=opt.lr, betas=betas)
        # One CUDA graph replays the whole step (both forwards, backwards and Adam updates): at
        # batch 128 a step is hundreds of small kernels, and launching them one by one from
        # Python costs more than running them. Needs the sync-free path: fused Adam, no scaler.
        self.cuda_graph = bool(cuda_graph and device.type == "cuda" and self.scaler is None
                           and world == 1 and opt.ngpu == 1 and self.optD.defaults.get("fused"))
        self.graph, self.eager_steps = None, 0
        self.sums = torch.zeros(5, device=device)  # Loss_D, Loss_G, D(x), D(G(z)) before/after
        self.count = 0
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
        non-finite value; the run then stops at the next log or save, before writing anything."""
        first = (self.bad_step < 0) & ~finite
        self.bad_step.copy_(torch.where(first, self.step_t, self.bad_step))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.bad_step.item() >= 0:  # fp16: GradScaler owns found_inf, so check here
                return
            self.scaler.step(opt)
            self.scaler.update()
            return
        loss.backward()
        if opt.defaults.get("fused"):
            opt.found_inf = (self.bad_step >= 0).float()
            opt.step()
        elif self.bad_step.item() < 0:
            opt.step()

    def step(self, real_u8, noise_gen):
        """One training iteration on a batch of uint8 images."""
        noise = torch.randn(real_u8.shape[0], self.nz, 1, 1, device=self.device, generator=noise_gen)
        self.count += 1
        if self.graph is not None:  # replay the captured step on new inputs
            self.static_real.copy_(real_u8)
            self.static_noise.copy_(noise)
            self.graph.replay()
        elif not self.cuda_graph:
            self.train_step(real_u8, noise)
        elif self.eager_steps < 3:  # warm up on a side stream (cuDNN autotuning, Adam state)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.train_step(real_u8, noise)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.eager_steps += 1
        else:  # capture once; capturing does not run the step, so replay it right away
            self.static_real, self.static_noise = real_u8.clone(), noise.clone()
            self.set_capturable()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.train_step(self.static_real, self.static_noise)
            self.graph.replay()

    def train_step(self, real_u8, noise):
        real = real_u8.float().div_(127.5).sub_(1).contiguous(memory_format=self.memory_format)
        b = real.shape[0]
        ones = torch.ones(b, device=self.device)
        zeros = torch.zeros(b, device=self.device)

        ############################
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        ############################
        self.optD.zero_grad(set_to_none=True)
        with self.autocast():
            fake = self.g(noise)
            # Real and fake go through D as separate batches, so each BatchNorm sees one kind of
            # image (pytorch/examples does the same). fake is detached: this step trains D only.
            out_real = self.d(real)
            out_fake = self.d(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(out_real.float(), ones)
                  + F.binary_cross_entropy_with_logits(out_fake.float(), zeros))
        finite_d = torch.isfinite(loss_d) & torch.isfinite(out_real).all() & torch.isfinite(out_fake).all()
        self.update(self.optD, loss_d, finite_d)

        ############################
        # (2) Update G: maximize log(D(G(z))), the non-saturating loss (Goodfellow et al. 2014,
        # section 3): log(1 - D(G(z))) has vanishing gradients early, when D rejects every fake.
        # The fake batch is reused through the updated D. D's parameters need no gradients here.
        ############################
        self.optG.zero_grad(set_to_none=True)
        self.netD.requires_grad_(False)
        with self.autocast():
            out_g = self.d_for_g(fake)
        loss_g = F.binary_cross_entropy_with_logits(out_g.float(), ones)  # fake labels are real for G
        finite_g = torch.isfinite(loss_g) & torch.isfinite(out_g).all()
        self.update(self.optG, loss_g, finite_g)
        self.netD.requires_grad_(True)
        self.step_t += 1

        with torch.no_grad():
            self.sums += torch.stack([loss_d, loss_g, torch.sigmoid(out_real.float()).mean(),
                                      torch.sigmoid(out_fake.float()).mean(), torch.sigmoid(out_g.float()).mean()])

    def read_stats(self):
        """Means since the last call, as floats: the one host sync, at log time."""
        values = (self.sums / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return values

    @torch.no_grad()
    def sample(self, noise):
        """Images from fixed noise. G is put in eval mode, so BatchNorm uses its running
        statistics: each image depends on its own z alone (not on the rest of the batch), the
        training statistics are left untouched, and --generate of one image works the same."""
        self.netG.eval()
        with self.autocast():
            images = self.netG(noise).float()
        self.netG.train()
        return images


# ------------------------------------------------------------------------------------------------
# Checkpoints, samples and logs. Every file is written atomically: a crash leaves the old or the
# new file, whole, never a torn one.
# ------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise Fail(EXIT_OUTPUT, f"could not write {path}: {e.strerror or e}; free disk space or fix "
                                "permissions of --outf (the previous file there is intact)")


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_stale_temporaries(outf):
    for tmp in glob.glob(os.path.join(outf, ".*.tmp-*")):
        try:
            os.remove(tmp)
        except OSError:
            pass


def load_file(path, what):
    """torch.load with the safe loader only: a file that would run code is refused, never run."""
    if not os.path.isfile(path):
        raise Fail(EXIT_FILE, f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # a crafted file can make the loader warn; one line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = "it holds Python objects beyond tensors, refused unread" if "weights_only" in str(e) \
            else "it is empty, truncated or not a PyTorch file"
        raise Fail(EXIT_FILE, f"{what} {path} cannot be loaded: {reason}")


def load_weights(net, path, what):
    """A state dict from --netG / --netD (pytorch/examples' files included), or the matching part
    of a checkpoint, into `net`; one line when it does not fit."""
    state = load_file(path, what)
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


ARCHITECTURE = ("nz", "ngf", "ndf", "nc", "imageSize", "batchSize", "manualSeed")


def make_checkpoint(tr, epoch, it, step, fixed_noise, config, history, noise_gen):
    rng = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"format": CHECKPOINT_FORMAT, "netG": tr.netG.state_dict(), "netD": tr.netD.state_dict(),
            "optG": tr.optG.state_dict(), "optD": tr.optD.state_dict(),
            "scaler": tr.scaler.state_dict() if tr.scaler else {},
            "epoch": epoch, "iter": it, "step": step, "fixed_noise": fixed_noise.cpu(),
            "config": config, "rng": rng, "history": history}


def read_checkpoint(path, config):
    ckpt = load_file(path, "--resume checkpoint")
    needed = {"format", "netG", "netD", "optG", "optD", "epoch", "iter", "step", "fixed_noise", "config", "rng", "history"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise Fail(EXIT_FILE, f"--resume {path} is not a checkpoint written by dcgan.py (give OUTF/checkpoint.pt)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise Fail(EXIT_FILE, f"--resume {path} has checkpoint format {ckpt['format']}; this dcgan.py reads {CHECKPOINT_FORMAT}")
    diff = [f"{k} {ckpt['config'].get(k)} saved vs {config[k]} requested"
            for k in ARCHITECTURE if ckpt["config"].get(k) != config[k]]
    if diff:
        raise Fail(EXIT_FILE, f"--resume {path} was made with other settings: {'; '.join(diff)}; "
                              "pass the saved values or start a new --outf")
    return ckpt


def tensors_in(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in tensors_in(item)]


def restore_rng(ckpt, noise_gen):
    rng = ckpt["rng"]
    random.setstate((3, tuple(rng["python"]), None))
    torch.set_rng_state(rng["torch"])
    noise_gen.set_state(rng["noise"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


LOG_FIELDS = ["epoch", "iter", "step", "loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "img_per_s"]


def write_losses(outf, history, plot):
    """losses.csv from the history (one row per logged iteration); with `plot`, losses.png too
    when matplotlib is installed (it is optional)."""
    def write(f):
        f.write((",".join(LOG_FIELDS) + "\n").encode())
        for row in zip(*(history[k] for k in LOG_FIELDS)):
            f.write((",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n").encode())
    atomic_write(os.path.join(outf, "losses.csv"), write)
    if not plot:
        return
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


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def hms(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def prepare_outf(outf):
    try:
        os.makedirs(outf, exist_ok=True)
        probe = os.path.join(outf, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise Fail(EXIT_OUTPUT, f"--outf {outf} cannot be written ({e.strerror or e}); choose another folder")


def generate(opt, device):
    """--generate N: N separate PNGs (what FID tools read) and one grid, from --netG."""
    state = load_file(opt.netG, "--netG")
    if isinstance(state, dict) and "netG" in state and "format" in state:
        state = state["netG"]
    try:
        nz, ngf, nc, size = generator_shape(clean_state_dict(state))
        netG = Generator(nz, ngf, nc, size)
    except Exception:
        raise Fail(EXIT_FILE, f"--netG {opt.netG} is not a generator state dict")
    load_weights(netG, opt.netG, "--netG")
    folder = os.path.join(opt.outf, "generated")
    prepare_outf(folder)
    if any(f.endswith(".png") for f in os.listdir(folder)):
        raise Fail(EXIT_OUTPUT, f"{folder} already holds images; choose another --outf")
    netG.to(device).eval()
    g = torch.Generator(device).manual_seed(opt.manualSeed)
    grid = []
    with torch.no_grad():
        for start in range(0, opt.generate, 256):
            z = torch.randn(min(256, opt.generate - start), nz, 1, 1, device=device, generator=g)
            images = netG(z).float().cpu()
            for i, img in enumerate(images):
                save_grid(img, os.path.join(folder, f"{start + i:06d}.png"))
            grid += images[:64 - len(grid)]
    save_grid(torch.stack(grid), os.path.join(opt.outf, "generated_grid.png"))
    print(f"wrote {opt.generate} images of {size}x{size} to {folder}/ and a grid to "
          f"{os.path.join(opt.outf, 'generated_grid.png')}")
    return 0


def train(opt, device, rank, world):
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    dtype, channels_last, use_compile, cuda_graph = choose_speed_settings(opt, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    resume_path = None
    if opt.resume is not None:
        resume_path = opt.resume or os.path.join(opt.outf, "checkpoint.pt")
    elif main_process and os.path.exists(os.path.join(opt.outf, "checkpoint.pt")):
        raise Fail(EXIT_OUTPUT, f"--outf {opt.outf} already holds a run (checkpoint.pt); pass --resume "
                                "to continue it, or choose another --outf")
    if main_process:
        prepare_outf(opt.outf)
        clean_stale_temporaries(opt.outf)

    dataset, nc, key = build_dataset(opt)
    config = {k: v for k, v in vars(opt).items() if isinstance(v, (int, float, str, bool, type(None)))}
    config["nc"] = nc
    ckpt = read_checkpoint(resume_path, config) if resume_path is not None else None

    torch.manual_seed(opt.manualSeed)
    random.seed(opt.manualSeed)
    netG, netD = Generator(opt.nz, opt.ngf, nc, opt.imageSize), Discriminator(nc, opt.ndf, opt.imageSize)
    netG.apply(weights_init)
    netD.apply(weights_init)
    if opt.netG:
        load_weights(netG, opt.netG, "--netG")
    if opt.netD:
        load_weights(netD, opt.netD, "--netD")
    fixed_noise = torch.randn(64, opt.nz, 1, 1)
    noise_gen = torch.Generator(device).manual_seed(opt.manualSeed + rank)  # per-rank noise
    history = {k: [] for k in LOG_FIELDS}
    epoch0, it0, step = 0, 0, 0
    if ckpt is not None:
        netG.load_state_dict(ckpt["netG"])
        netD.load_state_dict(ckpt["netD"])
        fixed_noise, history = ckpt["fixed_noise"], ckpt["history"]
        epoch0, it0, step = ckpt["epoch"], ckpt["iter"], ckpt["step"]
    tr = Trainer(netG, netD, opt, device, dtype, channels_last, use_compile, world, cuda_graph)
    if ckpt is not None:
        tr.optG.load_state_dict(ckpt["optG"])
        tr.optD.load_state_dict(ckpt["optD"])
        tr.set_capturable()
        if tr.scaler and ckpt["scaler"]:
            tr.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, noise_gen)
        log(f"resumed from {resume_path} at epoch {epoch0}, iteration {it0} (step {step})")
    fixed_noise = fixed_noise.to(device)

    preloaded = should_preload(opt, dataset, nc)
    data = preload(opt, dataset, key, device, rank, log) if preloaded else dataset
    if len(data) < opt.batchSize * world:
        raise Fail(EXIT_DATA, f"the data set has {len(data)} images, fewer than one batch of --batchSize "
                              f"{opt.batchSize}{f' x {world} processes' if world > 1 else ''}; lower --batchSize")
    batches = Batches(data, opt.batchSize, opt.manualSeed, rank, world, opt.workers, device)
    per_epoch = batches.per_epoch
    if main_process and not os.path.exists(os.path.join(opt.outf, "real_samples.png")):
        real = next(Batches(data, min(64, len(data) // world), opt.manualSeed, 0, 1, 0, torch.device("cpu")).epoch(0, 0))
        save_grid(real.float() / 127.5 - 1, os.path.join(opt.outf, "real_samples.png"))
    log(f"{opt.dataset}: {len(data)} images of {nc}x{opt.imageSize}x{opt.imageSize}, "
        f"{'decoded once, in ' + str(data.device) + ' memory' if preloaded else f'decoded each epoch by {opt.workers} workers'}; "
        f"device {device}, {world} process(es), global batch {opt.batchSize * world}, "
        f"precision {str(dtype).replace('torch.', '') if dtype else 'fp32'}, channels_last {channels_last}, "
        f"compile {use_compile}, CUDA graph {tr.cuda_graph}")

    ckpt_path = os.path.join(opt.outf, "checkpoint.pt")
    last_good = [resume_path if ckpt is not None else None]

    def check_finite(state=None):
        """Stop on the first non-finite loss or D output; before a save, also refuse to write a
        state holding inf or NaN anywhere (weights, BatchNorm statistics, Adam moments)."""
        bad = tr.bad_step.item()
        where = f"a non-finite loss or D output at epoch {bad // per_epoch}, iteration {bad % per_epoch} (step {bad})"
        if bad < 0 and state is not None:
            if not all(bool(torch.isfinite(t).all()) for t in tensors_in(state) if t.is_floating_point()):
                bad, where = step, f"non-finite weights or optimizer state at epoch {epoch}, step {step}"
        if bad >= 0:
            raise Fail(EXIT_DIVERGED, f"training diverged: {where}; nothing after it was saved; "
                                      f"last good checkpoint: {last_good[0] or 'none yet'}; try a lower --lr")

    def verify_ranks():
        """DDP keeps the replicas identical; check it where every rank arrives (epoch end, stop)."""
        if world > 1:
            flat = torch.cat([p.detach().float().flatten() for p in list(netG.parameters()) + list(netD.parameters())])
            everyone = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(everyone, flat)
            same = all(torch.equal(everyone[0], other) for other in everyone[1:])
            log(f"ranks agree: G and D weights identical on {world} processes" if same else
                f"warning: G and D weights differ between the {world} processes")

    def save(epoch, it, ckpt=None):
        ckpt = ckpt or make_checkpoint(tr, epoch, it, step, fixed_noise, config, history, noise_gen)
        check_finite(ckpt)
        if main_process:
            atomic_save(ckpt, ckpt_path)
            last_good[0] = ckpt_path
        return time.monotonic()

    # SIGINT / SIGTERM (how clusters pre-empt jobs): finish the current step, save, exit 128+signal.
    # Under DDP the ranks agree on stopping at log time, where they synchronise anyway.
    signals = []
    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop_signal(logged):
        if world == 1:
            return signals[0] if signals else 0
        if not logged:
            return 0
        flag = torch.tensor(signals[0] if signals else 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    try:
        total = 1 if opt.dry_run else opt.niter * per_epoch
        if opt.max_steps:
            total = min(total, step + opt.max_steps)
        last_save = tick = time.monotonic()
        tick_step = start_step = step
        tr.step_t.fill_(step)
        for epoch in range(epoch0, opt.niter):
            epoch_batches, it, first, epoch_start = batches.epoch(epoch, it0), it0, it0, time.monotonic()
            it0 = 0
            while it < per_epoch and step < total:
                tr.step(next(epoch_batches), noise_gen)
                step, it = step + 1, it + 1
                logged = it % opt.log_every == 0 or it == per_epoch or step == total
                if logged:
                    loss_d, loss_g, d_x, d_g_z1, d_g_z2 = tr.read_stats()
                    check_finite()
                    now = time.monotonic()
                    rate = (step - tick_step) * opt.batchSize * world / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    log(f"[{epoch}/{opt.niter}][{it}/{per_epoch}] Loss_D: {loss_d:.4f} Loss_G: {loss_g:.4f} "
                        f"D(x): {d_x:.4f} D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f} | {rate:.0f} img/s | "
                        f"left: epoch {hms((per_epoch - it) * opt.batchSize * world / rate)} "
                        f"run {hms((total - step) * opt.batchSize * world / rate)}", flush=True)
                    for k, v in zip(LOG_FIELDS, (epoch, it, step, loss_d, loss_g, d_x, d_g_z1, d_g_z2, rate)):
                        history[k].append(v)
                    if main_process:
                        write_losses(opt.outf, history, plot=False)
                signum = stop_signal(logged)
                if signum:
                    save(epoch, it)
                    log(f"stopped by signal {signum} at epoch {epoch}, iteration {it}; "
                        f"continue with --resume (checkpoint {ckpt_path})", flush=True)
                    return 128 + signum
                if (opt.save_every and step % opt.save_every == 0) or \
                        (opt.save_minutes and time.monotonic() - last_save > 60 * opt.save_minutes):
                    last_save = save(epoch, it)
            if it < per_epoch and not opt.dry_run:  # stopped by --max-steps
                verify_ranks()
                save(epoch, it)
                log(f"stopped after {step - start_step} iterations (--max-steps); checkpoint {ckpt_path}")
                return 0
            # End of epoch: a sample grid from the fixed noise, weights, checkpoint, loss plot.
            ckpt = make_checkpoint(tr, epoch + 1, 0, step, fixed_noise, config, history, noise_gen)
            check_finite(ckpt)
            seconds = time.monotonic() - epoch_start
            log(f"epoch {epoch} done: {it - first} iterations in {seconds:.1f} s "
                f"({(it - first) * opt.batchSize * world / seconds:.0f} img/s)")
            verify_ranks()
            if main_process:
                save_grid(tr.sample(fixed_noise), os.path.join(opt.outf, f"fake_samples_epoch_{epoch:03d}.png"))
                atomic_save(netG.state_dict(), os.path.join(opt.outf, f"netG_epoch_{epoch}.pth"))
                atomic_save(netD.state_dict(), os.path.join(opt.outf, f"netD_epoch_{epoch}.pth"))
                write_losses(opt.outf, history, plot=True)
            last_save = save(epoch + 1, 0, ckpt)
            if opt.dry_run or step >= total:
                break
        log(f"done: {step} iterations; samples, weights and checkpoint in {opt.outf}")
        return 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def main(argv=None):
    """Runs the command line; returns the exit code (0 on success). Errors in the user's input
    print one line to stderr and return a code from the table in README."""
    try:
        opt = parse_args(argv)
        device, rank, world = setup_distributed(opt)
        try:
            if opt.generate:
                return generate(opt, device) if rank == 0 else 0
            return train(opt, device, rank, world)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except Fail as e:
        print(f"dcgan.py: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("dcgan.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Tests for dcgan.py, in the order of the file: the networks, one training iteration, sampling,
data, checkpoints and files, devices and processes, the run, the command line. CPU only, tiny
models, a few minutes in all: python -m pytest -q"""
import contextlib
import functools
import gzip
import hashlib
import http.server
import inspect
import math
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the suite runs on the CPU, here and in every child process
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import dcgan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = ["--imageSize", "16", "--ngf", "8", "--ndf", "8", "--batchSize", "16", "--log-every", "4",
        "--score-images", "0"]
SCORED = ["--score-images", "64"]  # after TINY: the score, on few images


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own empty folder with its own cache: nothing in the checkout (an
    out/ left by README's first command, say) or in ~/.cache changes what a test sees."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def run_main(argv):
    """dcgan.main in this process; returns its exit code."""
    return dcgan.main([str(a) for a in argv])


def cli(args, **kw):
    """The real command line in a subprocess."""
    kw.setdefault("timeout", 300)
    return subprocess.run([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(a) for a in args],
                          capture_output=True, text=True, **kw)


def make_images(folder, n, size=(178, 218), seed=0, ext="jpg"):
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", size, colour).save(os.path.join(folder, f"{i:06d}.{ext}"))
    return folder


def make_numbered_images(folder, n, size=(24, 20)):
    """PNGs of one flat colour each, (i, 2i mod 256, 200): a batch's top-left pixels name its images."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i, 2 * i % 256, 200)).save(os.path.join(folder, f"{i:06d}.png"))
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """make(n, size=(w, h)): a folder tmp_path/imgs of n JPEGs, each one flat colour."""
    return lambda n, size=(20, 20): make_images(tmp_path / "imgs", n, size=size)


@pytest.fixture
def dry_run(tmp_path):
    """The folder of a --dry-run on synthetic faces: epoch 0's grids, weights and losses.csv, no checkpoint."""
    out = tmp_path / "dry"
    assert run_main(["--dataset", "synthetic", "--dry-run", "--outf", out, *TINY]) == 0
    return out


@pytest.fixture
def short_run(tmp_path):
    """The folder of a synthetic run stopped by --max-steps 2: its checkpoint.pt is mid-epoch."""
    out = tmp_path / "run"
    assert run_main(["--dataset", "synthetic", "--max-steps", 2, "--outf", out, *TINY]) == 0
    return out


def state(path):
    return torch.load(path, weights_only=True)


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def assert_same_training_state(a, b):
    assert ("netG_ema" in a) == ("netG_ema" in b)
    for key in ("netG", "netD", "optG", "optD") + (("netG_ema",) if "netG_ema" in a else ()):
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{key}{k} differs"
    assert (a["epoch"], a["iter"], a["step"]) == (b["epoch"], b["iter"], b["step"])


def tiny_nets():
    """G and D of width 8 for 16x16 images with the paper's init, seeded, and their Adam optimizers."""
    torch.manual_seed(0)
    G, D = dcgan.Generator(100, 8, 3, 16), dcgan.Discriminator(8, 3, 16)
    G.apply(dcgan.weights_init)
    D.apply(dcgan.weights_init)
    return G, D, *(torch.optim.Adam(net.parameters(), lr=0.0002, betas=(0.5, 0.999)) for net in (G, D))


def tiny_run(tmp_path, *flags):
    """A Run on fake data, tiny and on the CPU, set up and started as main() does, before its loop."""
    opt = dcgan.parse_args(["--dataset", "fake", *map(str, TINY), "--batchSize", "8", "--outf", str(tmp_path / "run"),
                            *map(str, flags)])
    dataset = dcgan.open_dataset(opt)
    run = dcgan.Run(opt, torch.device("cpu"), dcgan.Ranks(), dataset)
    run.start(dataset)
    return run


def random_batch(n=8, size=16):
    """Images in [-1, 1], as train_step takes them."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# The networks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("nc", [1, 3])
def test_g_and_d_map_z_to_images_and_images_to_one_logit_at_every_size(tmp_path, size, nc):
    G, D = dcgan.Generator(nz=10, ngf=4, nc=nc, image_size=size), dcgan.Discriminator(nc=nc, ndf=4, image_size=size)
    x = G(torch.randn(2, 10, 1, 1))
    assert x.shape == (2, nc, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (2,)
    torch.save(G.state_dict(), tmp_path / "g.pth")  # --generate reads the shape back from the file
    loaded, nz = dcgan.load_generator(str(tmp_path / "g.pth"))
    assert nz == 10 and {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in G.state_dict().items()}


def test_unsupported_size_is_refused():
    with pytest.raises(ValueError):
        dcgan.Generator(image_size=48)
    assert run_main(["--dataset", "synthetic", "--imageSize", "48"]) == dcgan.EXIT_USAGE


def test_weights_start_from_the_papers_normal_distributions():
    torch.manual_seed(0)
    G = dcgan.Generator()
    G.apply(dcgan.weights_init)
    convs = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    bn_w = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.mean()) < 1e-3 and abs(convs.std() - 0.02) < 1e-3
    assert abs(bn_w.mean() - 1) < 3e-3 and abs(bn_w.std() - 0.02) < 3e-3
    assert torch.equal(bn_b, torch.zeros_like(bn_b))


def examples_networks(nz=100, ngf=64, ndf=64, nc=3):
    """The 64x64 networks exactly as pytorch/examples dcgan/main.py lays them out."""
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
                nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
                nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

        def forward(self, x):
            return self.main(x)

    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

        def forward(self, x):
            return self.main(x)
    return G(), D()


def test_pytorch_examples_weights_load_and_compute_the_same(tmp_path):
    eg, ed = examples_networks(ngf=16, ndf=16)
    for m in (eg, ed):
        m.apply(dcgan.weights_init)
    torch.save(eg.state_dict(), tmp_path / "netG_epoch_0.pth")
    torch.save(ed.state_dict(), tmp_path / "netD_epoch_0.pth")
    assert list(eg.state_dict())[0] == "main.0.weight"
    G, D = dcgan.Generator(ngf=16), dcgan.Discriminator(ndf=16)
    dcgan.load_weights(G, str(tmp_path / "netG_epoch_0.pth"), "--netG", "netG")
    dcgan.load_weights(D, str(tmp_path / "netD_epoch_0.pth"), "--netD", "netD")
    z = torch.randn(4, 100, 1, 1)
    for m in (eg, ed, G, D):
        m.eval()
    with torch.no_grad():
        assert torch.allclose(G(z), eg(z))
        x = eg(z)
        assert torch.allclose(torch.sigmoid(D(x)), ed(x).flatten(), atol=1e-6)
    # and through the command line: --netG / --netD start training from them
    out = tmp_path / "run"
    assert run_main(["--dataset", "fake", "--ngf", 16, "--ndf", 16, "--batchSize", 8, "--dry-run",
                     "--netG", tmp_path / "netG_epoch_0.pth", "--netD", tmp_path / "netD_epoch_0.pth",
                     "--outf", out, "--cache-dir", ""]) == 0


def test_weights_of_a_wrapped_or_compiled_module_load(tmp_path):
    G = dcgan.Generator(ngf=8, image_size=16)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):  # DDP, compile, both
        torch.save({prefix + k: v for k, v in G.state_dict().items()}, tmp_path / "g.pth")
        loaded = dcgan.Generator(ngf=8, image_size=16)
        dcgan.load_weights(loaded, str(tmp_path / "g.pth"), "--netG", "netG")
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in G.state_dict().items()), prefix


# ------------------------------------------------------------------------------------------------
# One training iteration
# ------------------------------------------------------------------------------------------------

def test_one_training_step_on_fake_data_changes_every_weight():
    G, D, optG, optD = tiny_nets()
    before = [p.detach().clone() for p in list(G.parameters()) + list(D.parameters())]
    loss_d, loss_g, d_x, d_g_z1, d_g_z2 = dcgan.train_step(G, D, optG, optD, random_batch(), torch.randn(8, 100, 1, 1)).tolist()
    assert all(map(lambda v: v == v and abs(v) < 100, (loss_d, loss_g)))
    assert 0 < d_x < 1 and 0 < d_g_z1 < 1 and 0 < d_g_z2 < 1
    after = list(G.parameters()) + list(D.parameters())
    n_g = len(list(G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before[:n_g], after[:n_g])), "every G tensor must change"
    assert all(not torch.equal(a, b) for a, b in zip(before[n_g:], after[n_g:])), "every D tensor must change"
    assert all(p.requires_grad for p in D.parameters())


def test_fp16_gradient_scaler_updates_once_per_iteration():
    G, D, optG, optD = tiny_nets()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    for _ in range(3):
        dcgan.train_step(G, D, optG, optD, random_batch(), torch.randn(8, 100, 1, 1),
                         amp_dtype=torch.float16, scaler=scaler)
    # three iterations without inf: exactly one growth (two updates per iteration would give two)
    assert scaler.get_scale() == 2.0 ** 9 and int(scaler._growth_tracker) == 0


def test_the_lesson_runs_when_copied_into_another_file():
    """G, D, weights_init and train_step, their source alone, train with plain Adam as a reader's own file would:
    within 30 steps D learns to tell the real images from G's."""
    pieces = (dcgan.n_blocks, dcgan.Generator, dcgan.Discriminator, dcgan.weights_init, dcgan.train_step)
    source = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n" + \
        "\n\n".join(inspect.getsource(piece) for piece in pieces)
    lesson = {}
    exec(compile(source, "lesson.py", "exec"), lesson)
    assert "dcgan" not in lesson
    torch.manual_seed(0)
    G, D = lesson["Generator"](ngf=8, image_size=16), lesson["Discriminator"](ndf=8, image_size=16)
    G.apply(lesson["weights_init"])
    D.apply(lesson["weights_init"])
    optG, optD = (torch.optim.Adam(net.parameters(), lr=0.0002, betas=(0.5, 0.999)) for net in (G, D))
    real = dcgan.synthetic_faces(64, 16).float() / 127.5 - 1
    first = lesson["train_step"](G, D, optG, optD, real, torch.randn(64, 100, 1, 1))
    for _ in range(29):
        last = lesson["train_step"](G, D, optG, optD, real, torch.randn(64, 100, 1, 1))
    loss_d, loss_g, d_x, d_g_z1, d_g_z2 = last  # (measured over 3 seeds: Loss_D falls 0.3, D(x) - D(G(z)) 0.13-0.20)
    assert torch.isfinite(last).all() and loss_d < first[0] - 0.2 and d_x - d_g_z1 > 0.08, (first, last)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

def test_sampling_with_batch_statistics_leaves_g_untouched():
    torch.manual_seed(0)
    G = dcgan.Generator(10, 8, 3, 16)
    G.apply(dcgan.weights_init)
    G.train()(torch.randn(16, 10, 1, 1))  # some running statistics
    before = {k: v.clone() for k, v in G.state_dict().items()}
    z = torch.randn(8, 10, 1, 1)
    by_batch, by_running = dcgan.sample(G, z), dcgan.sample(G, z, batch_stats=False)
    assert not torch.allclose(by_batch, by_running)
    assert torch.allclose(dcgan.sample(G, z[:1], batch_stats=False), by_running[:1], atol=1e-6)  # eval: one image as in a batch
    assert all(torch.equal(v, before[k]) for k, v in G.state_dict().items()) and G.training
    assert torch.allclose(by_batch, G.train()(z), atol=1e-6)  # the default: this batch's statistics, as in training


def test_averaged_generator_follows_g_with_a_warm_up(tmp_path):
    run = tiny_run(tmp_path, "--ema", "0.9")
    G = run.netG
    floats = lambda net: {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}  # noqa: E731
    for t in range(40):
        ema_before = floats(run.netG_ema)
        run.train_one(random_batch(), torch.randn(8, 100, 1, 1))
        d = min(0.9, (1 + t) / (10 + t))  # 0.1 at the first step: the average is mostly G at once
        for k, v in floats(run.netG_ema).items():  # weights and BatchNorm statistics alike
            assert torch.allclose(v, d * ema_before[k] + (1 - d) * G.state_dict()[k], atol=1e-6), (t, k)
    assert not any(p.requires_grad for p in run.netG_ema.parameters())
    assert not torch.equal(run.netG_ema.main[0].weight, G.main[0].weight)


def test_slerp_walks_the_arc():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 100, 1, 1, generator=g), torch.randn(4, 100, 1, 1, generator=g)
    assert torch.allclose(dcgan.slerp(z0, z1, torch.zeros(4, 1)), z0, atol=1e-5)
    assert torch.allclose(dcgan.slerp(z0, z1, torch.ones(4, 1)), z1, atol=1e-5)
    mid = dcgan.slerp(z0, z1, torch.full((4, 1), 0.5))
    # the norm stays that of the ends (about 10 for 100-d Gaussians); the straight line's midpoint is ~7
    assert (mid.flatten(1).norm(dim=1) > 0.95 * torch.minimum(z0.flatten(1).norm(dim=1), z1.flatten(1).norm(dim=1))).all()
    assert (((z0 + z1) / 2).flatten(1).norm(dim=1) < 0.9 * mid.flatten(1).norm(dim=1)).all()
    assert torch.allclose(dcgan.slerp(z0, z0, torch.full((4, 1), 0.3)), z0, atol=1e-5)  # same ends


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def cached_files(cache):
    """The files in a cache folder but its lock files (empty, one a data set, kept)."""
    return sorted(f for f in os.listdir(cache) if not f.endswith(".lock"))


def decode(dataset):
    out = torch.empty(len(dataset), dataset.nc, *dataset[0][0].shape[1:], dtype=torch.uint8)
    dcgan.decode_all(dataset, 0, lambda *a: None, out)
    return out


def first_batch(argv):
    opt = dcgan.parse_args(argv + ["--cache-dir", ""])
    data = dcgan.open_dataset(opt)
    if not isinstance(data, torch.Tensor):
        data = decode(data)
    return next(dcgan.uint8_batches(data, list(range(opt.batchSize)), opt.batchSize)), opt.nc


@pytest.mark.parametrize("layout", ["parent", "itself", "torchvision"])
def test_celeba_layouts_find_the_image_folder(tmp_path, layout):
    folder = {"parent": "data/img_align_celeba", "itself": "data/img_align_celeba",
              "torchvision": "data/celeba/img_align_celeba"}[layout]
    make_images(tmp_path / folder, 10)
    make_images(tmp_path / "data" / "other_pictures", 7)  # beside the CelebA folder: never part of it
    root = tmp_path / ("data/img_align_celeba" if layout == "itself" else "data")
    opt = dcgan.parse_args(["--dataroot", str(root), "--imageSize", "32", "--batchSize", "4", "--cache-dir", ""])
    data = dcgan.open_dataset(opt)
    assert len(data.paths) == 10 and all(os.sep + "img_align_celeba" + os.sep in p for p in data.paths)
    batches = dcgan.epoch_batches(decode(data), opt, dcgan.Ranks(), 0, 0, torch.device("cpu"), torch.contiguous_format)
    batch = next(batches)  # as training sees it
    assert batch.shape == (4, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1 and opt.nc == 3


def framed(h, w, inner):
    """An h x w black picture with a white centre square of side `inner`."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    top, left = (h - inner) // 2, (w - inner) // 2
    img[:, top:top + inner, left:left + inner] = 255
    return img


@pytest.mark.parametrize("h, w, face", [(218, 178, 108), (109, 89, 54), (436, 356, 216)])
def test_celeba_face_crop_scales_with_the_picture(h, w, face):
    # the centre square of 108/178 of the width is white, the rest black: the crop keeps only white
    out = dcgan.image_transform("celeba", 32)(framed(h, w, face + 2))  # (+2: either rounding of the centre)
    assert out.shape == (3, 32, 32) and out.min() == 255


def test_celeba_already_square_is_not_padded():
    # a CelebA picture someone already cropped and resized to 64x64: used whole, no black border
    out = dcgan.image_transform("celeba", 32)(torch.full((3, 64, 64), 255, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.min() == 255


@pytest.mark.parametrize("nested", [False, True])
def test_folder_data_sets_may_be_flat_or_nested(tmp_path, nested):
    for c in ("a", "b") if nested else ("",):
        make_images(tmp_path / c, 6 if nested else 12, size=(40, 30), ext="png")
    batch, nc = first_batch(["--dataset", "folder", "--dataroot", str(tmp_path), "--imageSize", "16", "--batchSize", "8"])
    assert batch.shape == (8, 3, 16, 16)


@pytest.mark.parametrize("kind", ["fake", "synthetic"])
def test_fake_and_synthetic_data_need_no_files(kind):
    batch, nc = first_batch(["--dataset", kind, "--imageSize", "32", "--batchSize", "8"])
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.uint8
    assert batch.float().std() > 10  # not blank


def test_synthetic_is_seeded_and_face_like():
    a, b = dcgan.synthetic_faces(32, 32, seed=1), dcgan.synthetic_faces(32, 32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, dcgan.synthetic_faces(32, 32, seed=2))
    # eyes are dark: the darkest pixels of each image sit in the upper half, inside the head
    assert a.float().mean(1)[:, 8:16, 8:24].min() < 40
    assert dcgan.synthetic_faces(4, 16, nc=1).shape == (4, 1, 16, 16)


def test_odd_images_decode_each_into_its_own_place(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, 300, size=(30, 20))
    Image.new("L", (25, 25), 128).save(d / "gray.png")
    Image.new("RGBA", (25, 25), (1, 2, 3, 4)).save(d / "rgba.png")
    Image.new("P", (25, 25)).save(d / "palette.png")
    Image.new("CMYK", (25, 25), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.new("I;16", (9, 9), 1000).save(d / "deep.png")
    Image.new("RGB", (3, 900), (9, 9, 9)).save(d / "thin.png")
    (d / "notes.txt").write_text("not an image file: not listed")
    good = (d / "000000.jpg").read_bytes()
    with open(os.fsencode(d) + b"/caf\xe9.jpg", "wb") as f:  # a name that is not UTF-8
        f.write(good)
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), "--imageSize", "16", "--cache-dir", ""])
    data = dcgan.open_dataset(opt)
    assert not [p for p in data.paths if p.endswith(".txt")]
    same_images, cache_name = dcgan.data_keys(opt, data)
    assert same_images.startswith("folder-16px-307-") and cache_name
    decoded = decode(data)
    assert decoded.shape == (307, 3, 16, 16)
    for i, path in enumerate(data.paths):  # every file in its own place
        assert torch.equal(decoded[i], data.transform(dcgan.decode_image(path, 3))), path


@pytest.mark.parametrize("bad", ["garbage", "truncated", "three in one batch", "dangling link"])
def test_an_unreadable_image_stops_the_decode_in_one_line_naming_it(tmp_path, bad):
    d = make_images(tmp_path / "imgs", 300, size=(20, 20))
    good = (d / "000000.jpg").read_bytes()
    if bad == "dangling link":  # refused before the decode, where the data set is named
        os.symlink(tmp_path / "nowhere.png", d / "bad.png")
        opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), "--imageSize", "16"])
        with pytest.raises(dcgan.Fail) as e:
            dcgan.data_keys(opt, dcgan.open_dataset(opt))
        assert e.value.code == dcgan.EXIT_DATA and str(e.value).startswith(f"{d / 'bad.png'} cannot be read")
    else:
        for name in ["bad.png", "bad1.png", "bad2.png"][:3 if bad.startswith("three") else 1]:
            (d / name).write_bytes(good[:len(good) // 3] if bad == "truncated" else b"garbage")
    r = cli(["--dataset", "folder", "--dataroot", d, "--outf", tmp_path / "out", "--cache-dir", tmp_path / "c",
             "--workers", 1, *TINY])
    assert r.returncode == dcgan.EXIT_DATA and r.stderr.count("\n") == 1, r.stderr[-3000:]
    more = " (and 2 more in its batch)" if bad.startswith("three") else ""
    assert f"{d / 'bad.png'}{more} cannot be read; remove or replace unreadable files" in r.stderr
    assert not os.path.exists(tmp_path / "c") or cached_files(tmp_path / "c") == []  # no cache left


@pytest.mark.parametrize("command", [["--no-preload"], ["--export-real", 300]])
def test_an_unreadable_file_in_a_stream_stops_the_run_naming_it(tmp_path, command):
    """A file that a real DataLoader worker cannot read, in training with --no-preload and in --export-real
    alike: one line names it, and the run stops with exit 3."""
    d = make_images(tmp_path / "imgs", 299, size=(20, 20))
    (d / "000100.jpg").write_bytes(b"garbage")
    r = cli(["--dataset", "folder", "--dataroot", d, *TINY, "--batchSize", 10, "--workers", 1, "--outf", tmp_path / "o",
             "--niter", 1, *command])
    assert r.returncode == dcgan.EXIT_DATA and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert f"{d / '000100.jpg'} cannot be read; remove" in r.stderr
    if "--export-real" in command:  # no folder of some of the images, and no temporary
        assert os.listdir(tmp_path / "o") == []


def test_a_symlink_cycle_in_the_data_folder_is_followed_once(tmp_path):
    make_images(tmp_path / "imgs" / "a", 5, size=(20, 20))
    make_images(tmp_path / "elsewhere", 3, size=(20, 20))
    for name in ("up", "up2"):  # two links back to the top: walked naively, the tree has no end
        os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "a" / name)
    os.symlink(tmp_path / "elsewhere", tmp_path / "imgs" / "linked")  # a linked folder of images: followed
    code = f"import sys; sys.path.insert(0, {HERE!r}); import dcgan; print(len(dcgan.list_images({str(tmp_path / 'imgs')!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["8"], r.stderr[-2000:]


def test_the_cache_key_does_not_depend_on_how_dataroot_is_spelled(tmp_path, capsys, image_folder):
    image_folder(40)  # tmp_path/imgs, and the test runs in tmp_path
    cache = tmp_path / "cache"
    for i, root in enumerate(["imgs", "./imgs", str(tmp_path / "imgs"), "imgs/"]):
        assert run_main(["--dataset", "folder", "--dataroot", root, "--cache-dir", cache, "--dry-run", *TINY,
                         "--outf", tmp_path / f"o{i}"]) == 0
        assert ("memory-mapped from cache" in capsys.readouterr().out) == (i > 0), root
    assert len(cached_files(cache)) == 1


def test_decoded_data_set_is_cached_and_redone_when_the_folder_changes(tmp_path, capsys, image_folder):
    d = image_folder(40)
    cache = tmp_path / "cache"
    args = ["--dataset", "folder", "--dataroot", d, "--cache-dir", cache, "--dry-run", *TINY]
    assert run_main(args + ["--outf", tmp_path / "a"]) == 0
    files = cached_files(cache)
    assert len(files) == 1
    assert run_main(args + ["--outf", tmp_path / "b"]) == 0
    assert "from cache" in capsys.readouterr().out
    make_images(d, 41, size=(20, 20), seed=5)  # the source changed: a new cache replaces the old
    assert run_main(args + ["--outf", tmp_path / "c"]) == 0
    assert len(cached_files(cache)) == 1 and cached_files(cache) != files
    assert "from cache" not in capsys.readouterr().out


def test_decode_goes_straight_into_a_memory_mapped_cache(tmp_path, capsys):
    """The decoded set is written into a preallocated file and trained from it memory-mapped, so
    memory use does not grow with the data set; its images equal a decode into memory."""
    d = make_images(tmp_path / "imgs", 300, size=(30, 20))
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), "--imageSize", "16",
                            "--cache-dir", str(tmp_path / "cache"), "--workers", "0"])
    dataset = dcgan.open_dataset(opt)
    key = dcgan.data_keys(opt, dataset)[1]
    data = dcgan.preloaded(opt, dataset, key, torch.device("cpu"), print)
    files = cached_files(tmp_path / "cache")
    assert files == [f"{key}.npy"] and os.path.getsize(tmp_path / "cache" / files[0]) == 128 + 300 * 3 * 16 * 16
    assert data.shape == (300, 3, 16, 16)
    with open("/proc/self/maps") as maps:  # the tensor's memory is the file, mapped
        assert files[0] in maps.read()
    assert torch.equal(data, decode(dataset))
    again = dcgan.preloaded(opt, dataset, key, torch.device("cpu"), print)
    assert torch.equal(again, data) and "from cache" in capsys.readouterr().out
    # a run trains from it, and says so
    assert run_main(["--dataset", "folder", "--dataroot", d, "--cache-dir", tmp_path / "cache", "--dry-run",
                     "--outf", tmp_path / "out", *TINY]) == 0
    assert "memory-mapped from cache" in capsys.readouterr().out


def test_without_a_cache_the_set_is_decoded_into_memory_and_with_no_preload_streamed(image_folder):
    d = image_folder(40)
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), "--imageSize", "16", "--cache-dir", ""])
    dataset = dcgan.open_dataset(opt)
    load = lambda: dcgan.preloaded(opt, dataset, dcgan.data_keys(opt, dataset)[1], torch.device("cpu"), print)  # noqa: E731
    assert torch.equal(load(), decode(dataset))
    opt.preload = False
    assert load() is dataset


def test_a_16_bit_grey_png_keeps_its_grey(tmp_path):
    Image.new("I;16", (9, 9), 128 * 257).save(tmp_path / "deep.png")  # mid-grey in 16 bits
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    img = dcgan.decode_image(tmp_path / "deep.png", 3)
    assert img.shape == (3, 9, 9) and (img == 128).all(), img.unique()


def test_a_damaged_cache_is_decoded_again_with_one_warning(tmp_path, capsys, image_folder):
    """A cache cut by a few bytes, by ten whole images, or overwritten: one warning, a new decode, the same
    bytes as before; never a traceback, never fewer images."""
    d = image_folder(300)
    cache = tmp_path / "cache"
    args = ["--dataset", "folder", "--dataroot", d, "--cache-dir", cache, "--dry-run", *TINY]
    assert run_main(args + ["--outf", tmp_path / "a"]) == 0
    [name] = cached_files(cache)
    raw = (cache / name).read_bytes()
    for i, damaged in enumerate([raw[:-5], raw[:-10 * 3 * 16 * 16], b"not a cache"]):
        (cache / name).write_bytes(damaged)
        capsys.readouterr()
        assert run_main(args + ["--outf", tmp_path / f"b{i}"]) == 0
        said = capsys.readouterr()
        assert said.err.count("is damaged or does not match the data set: decoding it again") == 1, said.err
        assert "300 images of 3x16x16" in said.out and (cache / name).read_bytes() == raw
        assert cached_files(cache) == [name]


SLOW_DECODE = """
import os, sys, time
sys.path.insert(0, {here!r})
import dcgan
decode, go = dcgan.decode_image, os.environ.get("DCGAN_GO")
def slow(path, nc):  # about the speed of a CelebA JPEG on one core
    while go and not os.path.exists(go):  # (until the test says go)
        time.sleep(0.01)
    time.sleep(0.008)
    return decode(path, nc)
dcgan.decode_image = slow
sys.exit(dcgan.main(sys.argv[1:]))
"""


def slow_decode(tmp_path, d, cache, out, go=""):
    """A real run whose decode into the cache takes a few seconds (600 images), begun once the file
    `go` exists, if one is named."""
    driver = tmp_path / "slow.py"
    driver.write_text(SLOW_DECODE.format(here=HERE))
    args = ["--dataset", "folder", "--dataroot", d, "--cache-dir", cache, "--dry-run", *TINY, "--workers", 0,
            "--outf", out]
    return subprocess.Popen([sys.executable, str(driver)] + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DCGAN_GO": str(go)})


def wait_for_temporary(cache, timeout=60):
    """Until a decode into the cache is under way: its hidden temporary holds data."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cache.exists() and any(f.endswith(".tmp") and os.path.getsize(cache / f) > 0 for f in os.listdir(cache)):
            return
        time.sleep(0.01)
    raise AssertionError("no decode began")


def test_two_runs_decoding_one_data_set_at_once_share_one_whole_cache(tmp_path):
    """A second run on the same data set starts while the first is decoding it into the cache: it waits
    for the first and maps its file; the cache holds every image whole (no run truncates another's)."""
    d = make_numbered_images(tmp_path / "imgs", 600, size=(20, 20))
    cache, go = tmp_path / "cache", tmp_path / "go"
    first = slow_decode(tmp_path, d, cache, tmp_path / "o0", go)
    wait_for_temporary(cache)  # the first holds the lock and has begun its file
    second = slow_decode(tmp_path, d, cache, tmp_path / "o1")
    waiting = wait_for(second, "waiting for another process's decode")
    go.write_text("")  # the first decodes on, while the second waits
    runs = [first, second]
    said = [p.communicate(timeout=120) for p in runs]
    said[1] = ("".join(waiting) + said[1][0], said[1][1])
    assert [p.returncode for p in runs] == [0, 0], said
    assert "cached the decoded data set" in said[0][0] and "memory-mapped from cache" in said[1][0], said
    assert "warning" not in said[0][1] + said[1][1]
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), *TINY, "--cache-dir", str(cache)])
    dataset = dcgan.open_dataset(opt)
    name = dcgan.data_keys(opt, dataset)[1]
    assert sorted(os.listdir(cache)) == [f".{name}.npy.lock", name + ".npy"]
    assert torch.equal(dcgan.preloaded(opt, dataset, name, torch.device("cpu"), print), decode(dataset))


def test_a_decode_killed_midway_leaves_nothing_that_the_next_run_does_not_clean(tmp_path):
    d = make_numbered_images(tmp_path / "imgs", 600, size=(20, 20))
    cache = tmp_path / "cache"
    p = slow_decode(tmp_path, d, cache, tmp_path / "o1")
    wait_for_temporary(cache)
    time.sleep(0.5)
    p.kill()
    p.communicate()
    assert [f for f in os.listdir(cache) if f.endswith(".tmp")], "the kill did not land inside the decode"
    make_numbered_images(d, 601, size=(20, 20))  # and the data set changed meanwhile: another key
    assert run_main(["--dataset", "folder", "--dataroot", d, "--cache-dir", cache, "--dry-run", *TINY,
                     "--outf", tmp_path / "o2"]) == 0
    [name] = cached_files(cache)
    assert name.endswith(".npy") and not name.startswith(".")


def test_the_cache_name_follows_the_decodes_version_and_the_files_names(monkeypatch, image_folder):
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(image_folder(5)), *TINY])
    dataset = dcgan.open_dataset(opt)
    same_images, cache_name = dcgan.data_keys(opt, dataset)
    monkeypatch.setattr(dcgan, "DECODE_VERSION", dcgan.DECODE_VERSION + 1)
    assert dcgan.data_keys(opt, dataset)[0] == same_images and dcgan.data_keys(opt, dataset)[1] != cache_name
    monkeypatch.undo()
    # a file renamed with its time kept: other images (their order), another cache
    first, moved = dataset.paths[0], os.path.join(os.path.dirname(dataset.paths[0]), "zz.jpg")
    os.rename(first, moved)
    renamed = dcgan.open_dataset(opt)
    assert dcgan.data_keys(opt, renamed)[0] != same_images and dcgan.data_keys(opt, renamed)[1] != cache_name


# ------------------------------------------------------------------------------------------------
# Checkpoints and files
# ------------------------------------------------------------------------------------------------

def test_checkpoint_holds_everything_a_run_needs_to_go_on(short_run):
    ck = torch.load(short_run / "checkpoint.pt", weights_only=True)
    assert {"format", "netG", "netD", "optG", "optD", "epoch", "iter", "step", "fixed_noise", "config",
            "noise_rng", "history", "scores", "best_G"} <= ck.keys()
    assert (ck["epoch"], ck["iter"], ck["step"]) == (0, 2, 2)
    assert len(ck["noise_rng"]) == 1 and ck["noise_rng"][0].dtype == torch.uint8
    assert ck["config"]["ngf"] == 8 and ck["config"]["nc"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["netG"])
    assert len(ck["optD"]["state"]) == len(list(dcgan.Discriminator(8, 3, 16).parameters()))


def test_failed_atomic_write_names_the_cause(tmp_path):
    def torn(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(dcgan.Fail) as e:
        dcgan.atomic_write(str(tmp_path / "x.bin"), torn)
    assert e.value.code == dcgan.EXIT_OUTPUT and "No space left on device" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_errors_that_are_not_the_disks_are_not_called_disk_errors(tmp_path):
    """A CUDA out-of-memory (or any error but the disk's) while a file or an image folder is written keeps its
    own name and traceback; the previous file stays, the temporaries go."""
    (tmp_path / "x.bin").write_bytes(b"old")

    def out_of_memory(f):
        f.write(b"half")
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        dcgan.atomic_write(str(tmp_path / "x.bin"), out_of_memory)
    assert (tmp_path / "x.bin").read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]

    def batches():
        yield torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        dcgan.write_png_folder(str(tmp_path / "out" / "generated"), batches())
    assert os.listdir(tmp_path / "out") == []


def test_saves_work_where_a_folder_cannot_be_opened(tmp_path, monkeypatch):
    """As on Windows, opening a folder (to make the rename durable) fails. The rename is the save; it must
    not be reported as failed."""
    open_file, folders = os.open, []

    def open_no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            folders.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return open_file(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_no_folders)
    dcgan.atomic_write(str(tmp_path / "x.bin"), lambda f: f.write(b"new"))
    assert (tmp_path / "x.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]
    assert folders == [str(tmp_path)]  # the folder was tried


def file_size_limit(nbytes):
    """For a child process: writes past nbytes fail with EFBIG, as on a full disk or quota."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, image_folder):
    """Writes that fail part-way through a real torch.save (and a cache that finds no room): one
    line, exit 6, the old checkpoint byte for byte, no temporary file, however often it is tried."""
    d = image_folder(600)
    out = tmp_path / "out"
    args = ["--dataset", "folder", "--dataroot", d, "--outf", out, *TINY, "--max-steps", 2]
    assert run_main(args + ["--cache-dir", ""]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert len(before) > 300_000  # the limit below cuts it part-way
    for attempt in range(2):
        r = subprocess.run([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(a) for a in args] +
                           ["--resume", "--cache-dir", tmp_path / "cache"], capture_output=True, text=True,
                           timeout=300, preexec_fn=file_size_limit(200_000))
        errors = [line for line in r.stderr.splitlines() if not line.startswith("warning:")]
        assert r.returncode == dcgan.EXIT_OUTPUT, r.stderr
        assert len(errors) == 1 and "File too large" in errors[0] and "checkpoint.pt" in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        # the decoded cache (600 x 768 bytes) did not fit either: a warning, and training went on
        assert "decoding into memory" in r.stderr and "Loss_D" in r.stdout
        assert (out / "checkpoint.pt").read_bytes() == before
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert not os.path.exists(tmp_path / "cache") or not cached_files(tmp_path / "cache")


def test_damaged_checkpoint_is_named_damaged(tmp_path, capsys, short_run):
    out = short_run
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    for where in (len(raw) // 3, len(raw) // 2):  # a few KB overwritten inside the tensors
        damaged = bytearray(raw)
        damaged[where:where + 4096] = raw[where + 4:where + 4100]  # each float its neighbour: finite, only the checksum tells
        (tmp_path / "damaged.pt").write_bytes(damaged)
        code = run_main(["--dataset", "synthetic", "--outf", tmp_path / "new", "--resume", tmp_path / "damaged.pt", *TINY])
        err = capsys.readouterr().err
        assert code == dcgan.EXIT_FILE and "damaged" in err and err.count("\n") == 1, err
    # a checkpoint whose tensors hold NaN (which dcgan.py never writes) is damaged too
    ck = state(out / "checkpoint.pt")
    moment = ck["optD"]["state"][0]["exp_avg"]
    moment[(0,) * moment.dim()] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    assert run_main(["--dataset", "synthetic", "--outf", tmp_path / "new", "--resume", tmp_path / "nan.pt", *TINY]) == dcgan.EXIT_FILE
    assert "damaged" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--dataset", "fake", *TINY, "--outf", out, "--cache-dir", ""]  # 1024 images: 64 iterations an epoch
    assert run_main(args + ["--niter", 2]) == 0
    before = {f: ((out / f).read_bytes(), os.stat(out / f).st_mtime_ns) for f in os.listdir(out)}
    for niter in (2, 1):
        capsys.readouterr()
        assert run_main(args + ["--niter", niter, "--resume"]) == 0
        said = capsys.readouterr().out
        assert "is finished (2 epochs, 128 iterations); to train longer, --resume with a --niter above 2" in said
        assert "max-steps" not in said and "Loss_D" not in said
    assert {f: ((out / f).read_bytes(), os.stat(out / f).st_mtime_ns) for f in os.listdir(out)} == before


def test_a_resume_on_other_data_is_refused_in_one_line(tmp_path, image_folder):
    """The batches and their order follow the data set: another one, or files added to the folder, cannot go
    on exactly. Refused at once (it used to spin for good past the end of a shorter epoch)."""
    out, few = tmp_path / "out", [*TINY, "--batchSize", 8, "--niter", 2, "--workers", 0, "--cache-dir", ""]
    assert run_main(["--dataset", "synthetic", *few, "--max-steps", 200, "--outf", out]) == 0
    r = cli(["--dataset", "fake", *few, "--outf", out, "--resume"], timeout=60)
    assert r.returncode == dcgan.EXIT_FILE and r.stderr.count("\n") == 1, r.stderr
    assert "data synthetic-16px-8192 saved vs fake-16px-1024 now" in r.stderr
    d = image_folder(40)
    folder = ["--dataset", "folder", "--dataroot", d, *few, "--outf", tmp_path / "f"]
    assert run_main(folder + ["--max-steps", 2]) == 0
    shutil.copytree(d, tmp_path / "copy")  # the same files elsewhere (node-local scratch, say): it goes on
    moved = [a if a != d else tmp_path / "copy" for a in folder]
    assert run_main(moved + ["--resume", "--max-steps", 1]) == 0
    make_images(d, 41, size=(20, 20), seed=5)  # one more file
    r = cli(folder + ["--resume"], timeout=60)
    assert r.returncode == dcgan.EXIT_FILE and "data folder-16px-40-" in r.stderr and "vs folder-16px-41-" in r.stderr and r.stderr.count("\n") == 1


def test_adams_moments_in_another_memory_layout_resume_exactly(tmp_path):
    """Fused Adam walks weights and moments as flat memory. Moments saved contiguous under channels-last
    weights (as an earlier dcgan.py's --no-channels-last saved them) are rebuilt in the weights' layout:
    the resumed steps are bitwise those of the checkpoint as this version saves it."""
    args = ["--dataset", "synthetic", *TINY, "--cache-dir", ""]
    assert run_main(args + ["--outf", tmp_path / "a", "--max-steps", 3]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpt, relaid = state(tmp_path / "b" / "checkpoint.pt"), 0
    for name in ("optG", "optD"):
        for moments in ckpt[name]["state"].values():
            for k, v in moments.items():
                relaid += not v.is_contiguous()
                moments[k] = v.contiguous()
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    assert relaid > 10
    for x in "ab":
        assert run_main(args + ["--outf", tmp_path / x, "--resume", "--max-steps", 2]) == 0
    assert_same_training_state(state(tmp_path / "a" / "checkpoint.pt"), state(tmp_path / "b" / "checkpoint.pt"))


def test_a_checkpoint_of_another_device_type_is_refused_in_one_line(tmp_path, short_run):
    """G's noise comes from a generator of the device's own kind, and a CUDA generator's state (16 bytes)
    does not fit a CPU generator: a CUDA checkpoint resumed on the CPU is refused, not a traceback."""
    ck = state(short_run / "checkpoint.pt")
    ck["config"]["device"] = "cuda"
    ck["noise_rng"] = [torch.cuda.default_generators[0].get_state() if torch.cuda.is_available()
                       else torch.zeros(16, dtype=torch.uint8)]
    torch.save(ck, tmp_path / "cuda.pt")
    r = cli(["--dataset", "synthetic", *TINY, "--outf", tmp_path / "o", "--resume", tmp_path / "cuda.pt"])
    assert r.returncode == dcgan.EXIT_FILE and "device cuda saved vs cpu now" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(tmp_path, short_run):
    """Format 3 scored its epochs with another measure: its scores and best G cannot go on."""
    ck = state(short_run / "checkpoint.pt")
    ck["format"] = 3
    torch.save(ck, tmp_path / "older.pt")
    r = cli(["--dataset", "synthetic", *TINY, "--outf", tmp_path / "o", "--resume", tmp_path / "older.pt"])
    assert r.returncode == dcgan.EXIT_FILE and "not a checkpoint of this dcgan.py" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_resuming_into_a_folder_that_holds_another_run_is_refused(tmp_path, short_run):
    other = tmp_path / "other"
    assert run_main(["--dataset", "fake", *TINY, "--max-steps", 1, "--outf", other, "--cache-dir", ""]) == 0
    before = {f: (other / f).read_bytes() for f in os.listdir(other)}
    r = cli(["--dataset", "synthetic", *TINY, "--resume", short_run / "checkpoint.pt", "--outf", other])
    assert r.returncode == dcgan.EXIT_OUTPUT and "already holds a run; --resume continues it" in r.stderr
    assert r.stderr.count("\n") == 1
    r = cli(["--dataset", "fake", *TINY, "--dry-run", "--outf", other])
    assert r.returncode == dcgan.EXIT_OUTPUT and "already holds a run; a --dry-run would overwrite" in r.stderr
    assert {f: (other / f).read_bytes() for f in os.listdir(other)} == before
    # into a new folder it goes on, and from a copy of a checkpoint in its own folder (back to it)
    assert run_main(["--dataset", "synthetic", *TINY, "--resume", short_run / "checkpoint.pt",
                     "--outf", tmp_path / "new", "--max-steps", 1]) == 0
    assert state(tmp_path / "new" / "checkpoint.pt")["step"] == 3
    shutil.copy(short_run / "checkpoint.pt", short_run / "step2.pt")
    assert run_main(["--dataset", "synthetic", *TINY, "--resume", short_run / "step2.pt", "--outf", short_run,
                     "--max-steps", 3]) == 0
    assert state(short_run / "checkpoint.pt")["step"] == 5


def test_a_resumed_run_takes_the_learning_rate_and_beta1_it_is_given(tmp_path):
    args = ["--dataset", "fake", *TINY, "--outf", tmp_path / "out", "--cache-dir", ""]
    assert run_main(args + ["--max-steps", 2]) == 0
    assert run_main(args + ["--max-steps", 2, "--resume", "--lr", 0.0001, "--beta1", 0.6]) == 0
    ck = state(tmp_path / "out" / "checkpoint.pt")
    assert ck["step"] == 4 and ck["optG"]["param_groups"][0]["lr"] == 0.0001 == ck["config"]["lr"]
    assert ck["optD"]["param_groups"][0]["betas"] == (0.6, 0.999) == ck["optG"]["param_groups"][0]["betas"]


def test_losses_csv_is_appended_and_after_a_resume_continues_from_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--outf", out, *TINY, "--log-every", 1, "--niter", 1]
    assert run_main(args + ["--max-steps", 5]) == 0
    # rows logged after the last save belong to steps that run again: the resume drops them
    with open(out / "losses.csv", "a") as f:
        f.write("0,6,6,9,9,9,9,9,9\n")
    assert run_main(args + ["--max-steps", 4, "--resume"]) == 0
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == ",".join(dcgan.LOG_FIELDS)
    assert [int(r.split(",")[2]) for r in rows[1:]] == list(range(1, 10))
    assert state(out / "checkpoint.pt")["history"]["step"] == list(range(1, 10))


# ------------------------------------------------------------------------------------------------
# Devices and processes: two gloo processes under torchrun
# ------------------------------------------------------------------------------------------------

DRIVER = """
import hashlib, os, sys, time, torch
sys.path.insert(0, {here!r})
import dcgan
rank, trace = int(os.environ["RANK"]), os.environ["DCGAN_TRACE"]
open(f"{{trace}}/pid{{rank}}", "w").write(str(os.getpid()))
step, save = dcgan.Run.train_one, dcgan.Run.save

def traced_step(self, real, z):
    # what this rank trains on: the images (by their top-left pixel) and the sum of its noise
    pixels = ((real[:, :2, 0, 0] + 1) * 127.5).round().int().tolist()
    with open(f"{{trace}}/rank{{rank}}.txt", "a") as f:
        f.write(" ".join(".".join(map(str, p)) for p in pixels) + " | %.6f\\n" % z.sum().item())
    if os.environ.get("DCGAN_HANG_ON_RANK") == str(rank) and self.step == 3:
        time.sleep(600)  # a rank that stops answering: the others wait for it in a collective
    return step(self, real, z)
dcgan.Run.train_one = traced_step

def traced_save(self, *args, **kwargs):  # each rank's weights, to compare the replicas
    flat = torch.cat([p.detach().flatten() for p in list(self.netG.parameters()) + list(self.netD.parameters())])
    open(f"{{trace}}/weights{{rank}}", "w").write(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
    return save(self, *args, **kwargs)
dcgan.Run.save = traced_save

decode_all = dcgan.decode_all
def traced_decode(*args):
    open(f"{{trace}}/decoded{{rank}}", "w").close()
    if os.environ.get("DCGAN_DECODE_TOGETHER"):  # whether the other rank decodes at the same time
        deadline = time.time() + 20
        while not os.path.exists(f"{{trace}}/decoded{{1 - rank}}") and time.time() < deadline:
            time.sleep(0.01)
        if time.time() < deadline:
            open(f"{{trace}}/together{{rank}}", "w").close()
    return decode_all(*args)
dcgan.decode_all = traced_decode

if os.environ.get("DCGAN_NAN_ON_RANK") == str(rank):  # a fault on one rank alone
    forward, calls = dcgan.Discriminator.forward, []
    def poisoned(self, x):
        calls.append(1)
        out = forward(self, x)
        return out * float("nan") if len(calls) == 9 else out  # D in G's update of step 2
    dcgan.Discriminator.forward = poisoned

if os.environ.get("DCGAN_MNIST_MIRROR"):  # the MNIST download, from a local folder
    dcgan.torchvision.datasets.MNIST.mirrors = [os.environ["DCGAN_MNIST_MIRROR"]]
    dcgan.torchvision.datasets.MNIST.resources = [tuple(r.split(":")) for r in os.environ["DCGAN_MNIST_FILES"].split(",")]

code = dcgan.main(sys.argv[1:] + os.environ.get(f"DCGAN_ARGS_OF_RANK{{rank}}", "").split())
open(f"{{trace}}/exit{{rank}}", "w").write(str(code))
sys.exit(code)
"""


def torchrun(tmp_path, args, env=None, background=False):
    """dcgan.main in two gloo processes under torchrun, each leaving a trace of what it trained on,
    its pid and its exit code in tmp_path/trace."""
    trace = tmp_path / "trace"
    trace.mkdir(exist_ok=True)
    for f in trace.iterdir():
        f.unlink()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(here=HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)] + [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCGAN_TRACE": str(trace), **(env or {})}
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), trace
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env), trace


def exit_codes(trace):
    return [int((trace / f"exit{r}").read_text()) if (trace / f"exit{r}").exists() else None for r in (0, 1)]


def steps_of(trace, rank):
    """Per step: (set of image ids, noise sum) that `rank` trained on."""
    rows = []
    for line in (trace / f"rank{rank}.txt").read_text().splitlines():
        images, noise = line.split(" | ")
        rows.append((frozenset(images.split()), float(noise)))
    return rows


def test_torchrun_ranks_take_distinct_shards_and_noise_and_stay_identical(tmp_path):
    d = make_numbered_images(tmp_path / "imgs", 96)
    r, trace = torchrun(tmp_path, ["--dataset", "folder", "--dataroot", d, "--outf", tmp_path / "out",
                                   "--max-steps", 6, *TINY, "--batchSize", 8, "--log-every", 3])
    assert r.returncode == 0 and exit_codes(trace) == [0, 0], r.stderr[-3000:]
    assert "2 process(es), global batch 16" in r.stdout
    assert (trace / "weights0").read_text() == (trace / "weights1").read_text()  # the replicas stay identical
    assert r.stdout.count("Loss_D") == 2  # rank 0 alone logs
    assert "FutureWarning" not in r.stderr and "Traceback" not in r.stderr
    assert state(tmp_path / "out" / "checkpoint.pt")["step"] == 6
    a, b = steps_of(trace, 0), steps_of(trace, 1)
    assert len(a) == len(b) == 6
    for (images_a, noise_a), (images_b, noise_b) in zip(a, b):
        assert len(images_a) == len(images_b) == 8 and not images_a & images_b  # distinct shards
        assert noise_a != noise_b  # distinct noise
    assert len(set().union(*(x for x, _ in a + b))) == 96  # one epoch: every image once


def test_torchrun_resume_is_exact_and_each_rank_keeps_its_noise(tmp_path):
    d = make_numbered_images(tmp_path / "imgs", 96)
    base = ["--dataset", "folder", "--dataroot", d, *TINY, *SCORED, "--batchSize", 8, "--niter", 2,
            "--log-every", 3]
    r, trace = torchrun(tmp_path, base + ["--outf", tmp_path / "a"])  # 12 steps straight
    assert r.returncode == 0, r.stderr[-3000:]
    straight = [steps_of(trace, 0), steps_of(trace, 1)]
    r, trace = torchrun(tmp_path, base + ["--outf", tmp_path / "b", "--max-steps", 4])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = state(tmp_path / "b" / "checkpoint.pt")
    assert len(ck["noise_rng"]) == 2 and not torch.equal(ck["noise_rng"][0], ck["noise_rng"][1])
    r, trace = torchrun(tmp_path, base + ["--outf", tmp_path / "b", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [steps_of(trace, 0), steps_of(trace, 1)]
    assert resumed[0] == straight[0][4:] and resumed[1] == straight[1][4:]  # same images, same noise
    assert all(x[1] != y[1] for x, y in zip(*resumed))  # and the ranks' noise differs
    ca, cb = state(tmp_path / "a" / "checkpoint.pt"), state(tmp_path / "b" / "checkpoint.pt")
    assert_same_training_state(ca, cb)
    # rank 0 scores, and the resumed run keeps its scores and its best G
    assert ca["scores"] == cb["scores"] and [e for e, _ in ca["scores"]] == [0, 1]
    (best_epoch, best), last = min(ca["scores"], key=lambda row: row[1]), ca["scores"][-1][1]
    line = [x for x in r.stdout.splitlines() if x.startswith("epoch 1 done: ")]
    assert len(line) == 1 and line[0].endswith(f"; score {last:.4g}, best {best:.4g} (epoch {best_epoch})")
    for name in ("scores.csv", "netG_best.pth"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # another number of processes cannot continue it exactly: refused in one line
    r = cli(base + ["--outf", tmp_path / "b", "--resume"])
    assert r.returncode == dcgan.EXIT_FILE and "processes 2 saved vs 1 now" in r.stderr and r.stderr.count("\n") == 1


def one_error_line(r, needle):
    errors = [line for line in r.stderr.splitlines() if line.startswith("dcgan.py: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-3000:]
    assert 'dcgan.py", line' not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]


def test_torchrun_user_errors_end_every_rank_with_one_line(tmp_path):
    out = tmp_path / "out"
    syn = ["--dataset", "synthetic", *TINY, "--outf", out]
    assert run_main(syn + ["--max-steps", 1]) == 0
    r, trace = torchrun(tmp_path, syn)  # rank 0 alone checks --outf
    assert exit_codes(trace) == [dcgan.EXIT_OUTPUT] * 2
    one_error_line(r, "already holds a run")
    bad = make_images(tmp_path / "bad", 40, size=(20, 20))
    for i in range(5):
        (bad / f"broken{i}.jpg").write_bytes(b"garbage")
    r, trace = torchrun(tmp_path, ["--dataset", "folder", "--dataroot", bad, *TINY, "--outf", tmp_path / "o2"])
    assert exit_codes(trace) == [dcgan.EXIT_DATA] * 2  # found by the decode on local rank 0 alone
    one_error_line(r, "broken0.jpg (and 4 more in its batch) cannot be read")
    r, trace = torchrun(tmp_path, syn + ["--lr", "-1"])
    assert exit_codes(trace) == [dcgan.EXIT_USAGE] * 2
    one_error_line(r, "--lr")
    (tmp_path / "o3" / "scores.csv").mkdir(parents=True)  # rank 0 alone writes it, at the start
    r, trace = torchrun(tmp_path, ["--dataset", "synthetic", *TINY, *SCORED, "--outf", tmp_path / "o3"])
    assert exit_codes(trace) == [dcgan.EXIT_OUTPUT] * 2
    one_error_line(r, "scores.csv")


def test_torchrun_ranks_that_see_other_data_refuse_in_one_line(tmp_path):
    """Each node has its own copy of the data set (or of --outf): if the copies differ, the ranks
    would step through epochs of other lengths and wait in each other's collectives."""
    d, other = make_numbered_images(tmp_path / "a", 96), make_numbered_images(tmp_path / "b", 64)
    args = ["--dataset", "folder", "--dataroot", d, *TINY, "--outf", tmp_path / "out"]
    r, trace = torchrun(tmp_path, args, env={"DCGAN_ARGS_OF_RANK1": f"--dataroot {other}"})
    assert exit_codes(trace) == [dcgan.EXIT_DATA] * 2
    one_error_line(r, "the processes see other data or checkpoints")
    # one node holds an older copy of the checkpoint
    r, trace = torchrun(tmp_path, args + ["--max-steps", 2])
    assert exit_codes(trace) == [0, 0], r.stderr[-3000:]
    os.makedirs(tmp_path / "old")
    shutil.copy(tmp_path / "out" / "checkpoint.pt", tmp_path / "old" / "checkpoint.pt")
    r, trace = torchrun(tmp_path, args + ["--max-steps", 2, "--resume"])
    assert exit_codes(trace) == [0, 0], r.stderr[-3000:]
    env = {"DCGAN_ARGS_OF_RANK1": f"--resume {tmp_path / 'old' / 'checkpoint.pt'}"}
    r, trace = torchrun(tmp_path, args + ["--resume"], env=env)
    assert exit_codes(trace) == [dcgan.EXIT_DATA] * 2
    one_error_line(r, "the processes see other data or checkpoints")
    assert ", 4), (" in r.stderr and ", 2)]" in r.stderr  # the steps, rank by rank


def test_torchrun_without_a_cache_every_rank_decodes_at_once(tmp_path):
    d = make_numbered_images(tmp_path / "imgs", 96)
    args = ["--dataset", "folder", "--dataroot", d, "--cache-dir", "", *TINY, "--max-steps", 1,
            "--outf", tmp_path / "out"]
    r, trace = torchrun(tmp_path, args, env={"DCGAN_DECODE_TOGETHER": "1"})
    assert exit_codes(trace) == [0, 0], r.stderr[-3000:]
    assert (trace / "together0").exists() and (trace / "together1").exists()


def test_torchrun_a_stream_failure_met_by_one_rank_is_said_by_that_rank(tmp_path):
    """With --no-preload an unreadable file is found by the rank whose shard holds it, here rank 1,
    which rank 0 never hears of: rank 1 prints the line itself, naming it."""
    d = make_numbered_images(tmp_path / "imgs", 200)
    (d / "z.png").write_bytes(b"not a png")  # sorted after the good ones: index 200
    batch = 8

    def shard(seed, rank):  # the indices of this rank's full batches in epoch 0, as the run draws them
        sampler = torch.utils.data.DistributedSampler(range(201), 2, rank, seed=seed, drop_last=True)
        return list(sampler)[:len(sampler) // batch * batch]
    def first_images(seed):  # the 64 of real_samples.png, read by every rank
        return torch.randperm(201, generator=torch.Generator().manual_seed(seed))[:64].tolist()
    seed = next(s for s in range(100) if 200 in shard(s, 1) and 200 not in first_images(s))
    args = ["--dataset", "folder", "--dataroot", d, "--no-preload", "--workers", 0, *TINY,
            "--batchSize", batch, "--score-images", 0, "--manualSeed", seed, "--outf", tmp_path / "out"]
    r, trace = torchrun(tmp_path, args)
    assert exit_codes(trace)[1] == dcgan.EXIT_DATA, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "dcgan.py: error:" in line]
    assert len(errors) == 1 and f"{d / 'z.png'} cannot be read" in errors[0], r.stderr[-3000:]


def test_torchrun_refuses_one_device_for_every_rank(tmp_path):
    for flags, needle in ((["--device", "cuda:1"], "--device cuda:1: under torchrun"), (["--ngpu", 2], "--ngpu")):
        r, trace = torchrun(tmp_path, ["--dataset", "synthetic", *TINY, "--outf", tmp_path / "o", *flags])
        assert exit_codes(trace) == [dcgan.EXIT_USAGE] * 2, r.stderr[-3000:]
        one_error_line(r, needle)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("log_every", [3, 2])
def test_torchrun_nan_on_one_rank_stops_every_rank(tmp_path, log_every):
    """Rank 1's D output turns NaN in G's update of step 3: its loss is NaN, and G's weights on both ranks, since
    DDP shares the gradients. Logged at step 3, the loss stops both ranks; else the save after step 3 finds the
    weights, and nothing is written."""
    r, trace = torchrun(tmp_path, ["--dataset", "synthetic", *TINY, "--outf", tmp_path / "out", "--log-every",
                                   log_every, "--save-every", 1], env={"DCGAN_NAN_ON_RANK": "1"})
    assert exit_codes(trace) == [dcgan.EXIT_DIVERGED] * 2
    one_error_line(r, "a non-finite loss or D output in iterations 1 to 3" if log_every == 3
                   else "non-finite weights, optimizer state or losses at step 3")
    ck = state(tmp_path / "out" / "checkpoint.pt")  # saved before the NaN, finite
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in tensors(ck).values() if t.is_floating_point())


def test_torchrun_sigterm_to_one_rank_stops_every_rank_within_a_step_or_two(tmp_path):
    p, trace = torchrun(tmp_path, ["--dataset", "synthetic", *TINY, "--outf", tmp_path / "out",
                                   "--log-every", 100, "--niter", 50], background=True)
    wait_for(p, "[0/50][100/")
    os.kill(int((trace / "pid1").read_text()), signal.SIGTERM)  # rank 1 alone, between two log lines
    sent = len((trace / "rank1.txt").read_text().splitlines())
    p.communicate(timeout=120)
    assert exit_codes(trace) == [143, 143]
    step = state(tmp_path / "out" / "checkpoint.pt")["step"]
    assert sent <= step <= sent + 3, (sent, step)  # acted on at once, not at the next log line (200)


@pytest.fixture
def http_folder():
    """Serves a folder over HTTP on the loopback address, as a download mirror does:
    folder -> (URL, list of the paths asked for)."""
    servers, asked = [], []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(f"{self.command} {self.path}")

    def serve(folder):
        handler = functools.partial(Handler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", asked
    yield serve
    for server in servers:
        server.shutdown()


def make_mnist_mirror(folder, n=64):
    """The four MNIST files, tiny, gzipped as the real mirror serves them: (folder, files)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    contents = {"train-images-idx3-ubyte": (2051, [n, 28, 28]), "train-labels-idx1-ubyte": (2049, [n]),
                "t10k-images-idx3-ubyte": (2051, [8, 28, 28]), "t10k-labels-idx1-ubyte": (2049, [8])}
    files = []
    for name, (magic, shape) in contents.items():
        header = b"".join(v.to_bytes(4, "big") for v in [magic] + shape)
        body = torch.randint(0, 10 if magic == 2049 else 256, shape, generator=g, dtype=torch.uint8).numpy().tobytes()
        data = gzip.compress(header + body)
        (folder / (name + ".gz")).write_bytes(data)
        files.append(f"{name}.gz:{hashlib.md5(data).hexdigest()}")
    return folder, ",".join(files)


def test_mnist_downloads_into_a_new_folder_once_per_node(tmp_path, http_folder):
    folder, files = make_mnist_mirror(tmp_path / "mirror")
    mirror, asked = http_folder(folder)
    root = tmp_path / "new" / "mnist"  # does not exist yet
    r, trace = torchrun(tmp_path, ["--dataset", "mnist", "--dataroot", root, *TINY, *SCORED, "--batchSize", 8,
                                   "--max-steps", 2, "--outf", tmp_path / "out", "--log-every", 1],
                        env={"DCGAN_MNIST_MIRROR": mirror, "DCGAN_MNIST_FILES": files})
    assert r.returncode == 0 and exit_codes(trace) == [0, 0], r.stderr[-3000:]
    # four files, fetched by local rank 0 alone (torchvision asks once to follow redirects, once to fetch)
    gets = [a for a in asked if a.startswith("GET")]
    assert len(set(gets)) == 4 and all(gets.count(g) <= 2 for g in gets), asked
    assert sorted(os.listdir(root / "MNIST" / "raw"))[:2] == ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"]
    assert (trace / "decoded0").exists() and not (trace / "decoded1").exists()  # decoded once per node
    assert "1 images of 1x16x16" not in r.stdout and "64 images of 1x16x16" in r.stdout


def test_torchrun_mnist_refused_on_rank_0_alone_ends_both_ranks_in_one_line(tmp_path, http_folder):
    """The download runs on local rank 0 first, as a phase of its own: a refusal that rank 0 alone finds
    afterwards (--outf holds a run) ends both ranks with one line, none left waiting in a collective."""
    folder, files = make_mnist_mirror(tmp_path / "mirror")
    mirror, _ = http_folder(folder)
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", *TINY, "--max-steps", 1, "--outf", out]) == 0
    r, trace = torchrun(tmp_path, ["--dataset", "mnist", "--dataroot", tmp_path / "mnist", *TINY, "--outf", out],
                        env={"DCGAN_MNIST_MIRROR": mirror, "DCGAN_MNIST_FILES": files})
    assert exit_codes(trace) == [dcgan.EXIT_OUTPUT] * 2, r.stderr[-3000:]
    one_error_line(r, "already holds a run")


# ------------------------------------------------------------------------------------------------
# The run: learning, warnings, resume, signals, divergence
# ------------------------------------------------------------------------------------------------

def mean_image_distance(G, data, nz):
    torch.manual_seed(0)
    G.eval()
    with torch.no_grad():
        fake = G(torch.randn(256, nz, 1, 1))
    real = data.float() / 127.5 - 1
    return (fake.mean(0) - real.mean(0)).pow(2).mean().item()


def test_a_short_synthetic_run_moves_g_toward_the_data(tmp_path, capsys):
    """G's mean image moves toward the data's mean image (a face on a background); it would not
    if the G step did nothing."""
    out = tmp_path / "run"
    data = dcgan.synthetic_faces(8192, 16, seed=999)
    G0 = dcgan.Generator(100, 64, 3, 16)
    torch.manual_seed(999)
    G0.apply(dcgan.weights_init)
    start = mean_image_distance(G0, data, 100)
    assert run_main(["--dataset", "synthetic", "--imageSize", 16, "--batchSize", 64,
                     "--niter", 3, "--max-steps", 300, "--outf", out, "--log-every", 100,
                     "--score-images", 0]) == 0
    G = dcgan.Generator(100, 64, 3, 16)
    G.load_state_dict(state(out / "checkpoint.pt")["netG"])
    end = mean_image_distance(G, data, 100)
    assert end < 0.35 * start, (start, end)
    # and a healthy run raises no collapse warning
    assert "warning" not in capsys.readouterr().err
    assert all(r.endswith(",") for r in (out / "losses.csv").read_text().splitlines()[1:])


def test_a_collapsing_run_is_warned_once_and_logged(tmp_path, capsys):
    """A run made to fail: G starts from all-zero weights (every sample the same grey) and a high
    --lr lets D win outright. Both warnings come once, and losses.csv names them from then on."""
    G = dcgan.Generator(100, 8, 3, 16)
    torch.save({k: torch.zeros_like(v) for k, v in G.state_dict().items()}, tmp_path / "zero.pth")
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", *TINY, "--netG", tmp_path / "zero.pth", "--lr", 0.005,
                     "--max-steps", 500, "--log-every", 25, "--outf", out]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: iteration 200 (epoch 0): the samples from the fixed noise have stopped varying") == 1, err
    assert err.count("D has rejected nearly every fake") == 1 and err.count("try a lower --lr") == 2, err
    rows = [r.split(",") for r in (out / "losses.csv").read_text().splitlines()]
    assert rows[0][-1] == "warning"
    warnings = {int(r[2]): r[-1] for r in rows[1:]}
    assert warnings[175] == "" and warnings[200] == "collapsed" and warnings[500] == "d_wins+collapsed"


def test_dry_run_writes_the_epoch_files_and_no_checkpoint(tmp_path):
    out = tmp_path / "out"
    r = cli(["--dataset", "fake", "--dry-run", "--outf", out, "--cache-dir", "", *TINY, *SCORED])
    assert r.returncode == 0, r.stderr
    assert "Loss_D" in r.stdout and "img/s" in r.stdout
    names = set(os.listdir(out))
    assert {"real_samples.png", "fake_samples_epoch_000.png", "netG_epoch_0.pth", "netD_epoch_0.pth",
            "losses.csv"} <= names
    assert "checkpoint.pt" not in names and "netG_best.pth" not in names  # never blocks a later run
    with Image.open(out / "fake_samples_epoch_000.png") as im:
        assert im.size[0] > 16
    g = state(out / "netG_epoch_0.pth")
    assert next(iter(g)) == "main.0.weight" and not any(k.startswith(("module.", "_orig_mod.")) for k in g)
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,iter,step,loss_d,loss_g") and len(rows) == 2
    assert run_main(["--dataset", "fake", "--max-steps", 1, "--outf", out, "--cache-dir", "", *TINY]) == 0


def test_a_best_g_whose_checkpoint_has_gone_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    argv = ["--dataset", "fake", "--niter", 1, "--outf", out, *TINY, *SCORED]
    assert run_main(argv) == 0
    (out / "checkpoint.pt").unlink()  # moved away, say, and the best G kept
    kept = {name: (out / name).read_bytes() for name in ("netG_best.pth", "scores.csv")}
    for extra in ([], ["--dry-run"]):
        r = cli(argv + extra)
        assert r.returncode == dcgan.EXIT_OUTPUT and "holds an earlier run's netG_best.pth; move it" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    assert {name: (out / name).read_bytes() for name in kept} == kept


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags in Linux's way")
def test_amp_auto_is_bf16_where_the_cpu_has_it_natively(tmp_path, capsys):
    flags = open("/proc/cpuinfo").read().split()
    native = "amx_tile" in flags or "avx512_bf16" in flags
    assert dcgan.native_bf16(torch.device("cpu")) == native
    for amp, precision in (("auto", "bf16" if native else "fp32"), ("off", "fp32"), ("bf16", "bf16")):
        argv = ["--dataset", "fake", "--dry-run", "--score-images", 0, "--outf", tmp_path / amp, *TINY]
        assert run_main(argv + ["--amp", amp]) == 0
        assert f"global batch 16, {precision}, " in capsys.readouterr().out
    # auto is fp32 under nn.DataParallel (--ngpu above 1), whose threads would autocast to fp16
    opt = dcgan.parse_args(["--dataset", "fake", "--ngpu", "2"])
    assert dcgan.speed_settings(opt, torch.device("cpu"), 1)[0] is None


def test_the_score_of_real_images_against_real_ones_is_far_below_an_untrained_gs():
    faces = dcgan.synthetic_faces(1500, 16, seed=1).float() / 127.5 - 1
    real, other, held_out = faces[:500], faces[500:1000], faces[1000:]
    before = torch.random.get_rng_state()
    net = dcgan.train_rotation_net(dcgan.at_32(faces[:1000]), seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training's noise is untouched
    with torch.no_grad():  # it has learnt to tell the turns of faces it has not seen
        turns = torch.arange(len(held_out)) % 4
        turned = torch.stack([torch.rot90(x, int(k), (1, 2)) for x, k in zip(held_out, turns)])
        accuracy = (net(dcgan.at_32(turned)).argmax(1) == turns).float().mean().item()
    assert accuracy > 0.9, accuracy
    torch.manual_seed(0)
    G = dcgan.Generator(100, 8, 3, 16).apply(dcgan.weights_init)
    fake = dcgan.sample(G, torch.randn(500, 100, 1, 1))
    reals = dcgan.features(net, real)
    assert reals.shape == (500, 256) and reals.dtype == torch.float64
    floor = dcgan.frechet_distance(reals, dcgan.features(net, other))
    untrained = dcgan.frechet_distance(reals, dcgan.features(net, fake))
    assert abs(dcgan.frechet_distance(reals, reals)) < 1e-6 and 0 < floor < 0.05 * untrained, (floor, untrained)
    flat = dcgan.frechet_distance(reals, dcgan.features(net, torch.zeros_like(real)))
    assert math.isfinite(flat) and flat > floor
    # the same images and seed, the same network
    again = dcgan.train_rotation_net(dcgan.at_32(faces[:1000]), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(net.state_dict().values(), again.state_dict().values()))


def scores_csv(out):
    return [(int(e), float(s)) for e, s in (r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:])]


def test_netG_best_is_the_best_scoring_epochs_g(tmp_path, capsys):
    """Two epochs, then two more resumed at 5,000x the learning rate, which spoils G: netG_best.pth
    stays the averaged G (--ema) of the lowest score in scores.csv, and each epoch line gives its
    score and the best. A resume from an earlier checkpoint takes the best G as that one had it."""
    out = tmp_path / "out"
    base = ["--dataset", "synthetic", *TINY, "--ema", 0.9, "--score-images", 256, "--outf", out]

    def assert_best_is_kept(epochs):
        scores = scores_csv(out)
        assert [e for e, _ in scores] == list(range(epochs))
        best = min(scores, key=lambda row: row[1])
        kept = state(out / "netG_best.pth")
        assert kept.keys() == state(out / "netG_epoch_0.pth").keys()
        for e, _ in scores:
            same = all(torch.equal(v, state(out / f"netG_ema_epoch_{e}.pth")[k]) for k, v in kept.items())
            assert same == (e == best[0]), (e, scores)
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"epoch {epochs - 1} done: ")]
        assert line and line[0].endswith(f"; score {scores[-1][1]:.4g}, best {best[1]:.4g} (epoch {best[0]})")
        return best[0]

    assert run_main(base + ["--niter", 1]) == 0
    shutil.copy(out / "checkpoint.pt", out / "after_epoch_0.pt")
    assert run_main(base + ["--niter", 2, "--resume"]) == 0
    assert assert_best_is_kept(2) == 1  # (else the rest could not tell the best G from another)
    assert run_main(base + ["--niter", 4, "--lr", 1, "--resume"]) == 0
    assert assert_best_is_kept(4) == 1
    # back to epoch 0's checkpoint, and epoch 1 again, spoilt: the best is epoch 0's G once more
    assert run_main(base + ["--niter", 2, "--lr", 1, "--resume", out / "after_epoch_0.pt"]) == 0
    assert assert_best_is_kept(2) == 0
    # a data set smaller than --score-images uses what it has; 0 turns the score off
    d = make_images(tmp_path / "imgs", 40, size=(20, 20))
    for n, scored in ((1000, True), (0, False)):
        out = tmp_path / f"small{n}"
        assert run_main(["--dataset", "folder", "--dataroot", d, *TINY, "--niter", 1, "--score-images", n,
                         "--outf", out]) == 0
        assert (out / "scores.csv").exists() == (out / "netG_best.pth").exists() == scored
    assert len(scores_csv(tmp_path / "small1000")) == 1


def resume_pair(tmp_path, extra, stop):
    """An uninterrupted run and one that is stopped by `stop(args, out)` and resumed."""
    base = ["--cache-dir", "", *TINY, *SCORED, "--niter", 2] + extra
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(base + ["--outf", a]) == 0
    stop(base, b)
    r = cli(base + ["--outf", b, "--resume"])
    assert r.returncode == 0, r.stderr
    ca, cb = state(a / "checkpoint.pt"), state(b / "checkpoint.pt")
    assert_same_training_state(ca, cb)
    # the scores and the best G, bitwise
    assert ca["scores"] == cb["scores"] and len(ca["scores"]) == 2
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
    assert all(torch.equal(v, state(b / "netG_best.pth")[k]) for k, v in state(a / "netG_best.pth").items())
    # the log continues: every row of the uninterrupted run is there (plus one where it stopped)
    assert set(ca["history"]["step"]) <= set(cb["history"]["step"])
    return a, b


def stop_with_max_steps(n):
    def stop(base, out):
        assert run_main(base + ["--outf", out, "--max-steps", n]) == 0
    return stop


@pytest.mark.parametrize("steps", [5, 12])  # 12 iterations: exactly one epoch of the folder below
def test_resume_is_bitwise_exact(tmp_path, steps, image_folder):
    d = image_folder(200, size=(24, 20))
    resume_pair(tmp_path, ["--dataset", "folder", "--dataroot", d, "--workers", 0], stop_with_max_steps(steps))


def test_averaged_generator_resumes_exactly_and_is_what_generate_uses(tmp_path):
    a, b = resume_pair(tmp_path, ["--dataset", "fake", "--ema", 0.99], stop_with_max_steps(70))  # 64 a epoch
    ck = state(b / "checkpoint.pt")
    assert "netG_ema" in ck and not torch.equal(ck["netG_ema"]["main.0.weight"], ck["netG"]["main.0.weight"])
    assert torch.equal(state(a / "netG_ema_epoch_0.pth")["main.0.weight"], state(b / "netG_ema_epoch_0.pth")["main.0.weight"])
    for name, weights in (("ckpt", a / "checkpoint.pt"), ("ema", a / "netG_ema_epoch_1.pth"), ("raw", a / "netG_epoch_1.pth")):
        assert run_main(["--generate", 4, "--netG", weights, "--outf", tmp_path / name]) == 0
    png = lambda name: (tmp_path / name / "generated" / "000003.png").read_bytes()  # noqa: E731
    assert png("ckpt") == png("ema") != png("raw")


def wait_for(proc, text, timeout=120):
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if text in line:
            return lines
        if not line and proc.poll() is not None:
            break
    raise AssertionError("never printed " + text + ":\n" + "".join(lines) + (proc.stderr.read() if proc.stderr else ""))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_is_bitwise_exact(tmp_path, workers, image_folder):
    d = image_folder(200, size=(24, 20))

    def stop(base, out):
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(x) for x in base] +
                             ["--outf", str(out), "--log-every", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(p, "[0/2][3/12]")
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        rest = p.stdout.read()
        assert p.returncode == 143 and "stopped by signal 15" in rest
        ck = state(out / "checkpoint.pt")
        assert 0 < ck["step"] < 24

    resume_pair(tmp_path, ["--dataset", "folder", "--dataroot", d, "--workers", workers, "--no-preload"], stop)


def test_sigint_exits_130_with_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "dcgan.py"), "--dataset", "synthetic", "--outf", str(out),
                          *TINY, "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, "[0/25][2/")
    p.send_signal(signal.SIGINT)
    p.wait(60)
    assert p.returncode == 130
    assert state(out / "checkpoint.pt")["step"] >= 2


def children(pid):
    """The pids of pid's child processes (its DataLoader workers)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_saves_and_exits(tmp_path, signum, image_folder):
    """What a terminal's Ctrl-C sends, and a scheduler's SIGTERM to a job: the signal reaches the main process
    and its two DataLoader workers at once, and twice in a millisecond (a scheduler and torchrun may both
    send it). The run saves and exits with 128 + the signal."""
    d = image_folder(400, size=(24, 20))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "dcgan.py"), "--dataset", "folder", "--dataroot",
                          str(d), "--no-preload", "--workers", "2", *map(str, TINY), "--log-every", "1",
                          "--save-minutes", "0", "--outf", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(p, "[0/25][3/")
    assert len(children(p.pid)) == 2  # the workers are there to be signalled
    os.killpg(p.pid, signum)
    time.sleep(0.001)
    os.killpg(p.pid, signum)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signum, err
    assert f"stopped by signal {signum}" in rest and "Traceback" not in err and "again" not in err, err
    assert state(out / "checkpoint.pt")["step"] >= 3


def test_a_signal_on_the_runs_last_iteration_still_finishes_its_last_epoch(tmp_path, monkeypatch, capsys):
    """SIGTERM lands as the last iteration of the last epoch is logged: the epoch's weights, grid
    and score are written before the run stops, so that nothing is missing when a resume finds
    the run finished."""
    log_progress = dcgan.Run.log_progress

    def log_then_signal(run, total):
        log_progress(run, total)
        if run.step == total:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(dcgan.Run, "log_progress", log_then_signal)
    out = tmp_path / "out"
    argv = ["--dataset", "fake", *TINY, "--niter", 2, "--score-images", 64, "--outf", out]
    assert run_main(argv) == 128 + signal.SIGTERM
    assert (out / "netG_epoch_1.pth").exists() and [e for e, _ in scores_csv(out)] == [0, 1]
    assert "stopped by signal 15 at epoch 2, iteration 0" in capsys.readouterr().out
    assert run_main(argv + ["--resume"]) == 0 and "is finished (2 epochs" in capsys.readouterr().out


def test_a_kill_inside_the_last_epochs_save_loses_none_of_its_files(tmp_path):
    """--save-every falls on the epoch's last iteration, and the process is killed inside the epoch's
    own save (while it scores): the resumed run still writes the epoch's weights, grid and score."""
    out = tmp_path / "out"
    argv = ["--dataset", "fake", *TINY, "--niter", 1, "--score-images", 64, "--save-every", 32, "--outf", out]
    code = (f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport dcgan\n"
            "dcgan.Run.score = lambda run, epoch: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"dcgan.main({[str(a) for a in argv]!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL and "[0/1][64/64]" in r.stdout, r.stderr
    assert not (out / "netG_epoch_0.pth").exists()
    r = cli(argv + ["--resume"])
    assert r.returncode == 0 and "resumed from" in r.stdout and "is finished" not in r.stdout, r.stdout
    assert (out / "netG_epoch_0.pth").exists() and (out / "fake_samples_epoch_000.png").exists()
    assert [e for e, _ in scores_csv(out)] == [0] and (out / "netG_best.pth").exists()
    ck = state(out / "checkpoint.pt")
    assert (ck["epoch"], ck["iter"], ck["step"]) == (1, 0, 64)


def test_a_kill_inside_the_first_checkpoints_save_leaves_a_folder_the_same_command_reruns_in(tmp_path):
    """Killed while epoch 0's checkpoint is written, before any other: netG_best.pth, written after
    the checkpoint, is not there to make the rerun refuse the folder."""
    out = tmp_path / "out"
    argv = [str(a) for a in ["--dataset", "fake", *TINY, "--niter", 1, "--score-images", 64, "--outf", out]]
    code = (f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport dcgan\n"
            "write = dcgan.atomic_write\n"
            "def killed_in_the_checkpoint(path, how):\n"
            "    if path.endswith('checkpoint.pt'):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    write(path, how)\n"
            f"dcgan.atomic_write = killed_in_the_checkpoint\ndcgan.main({argv!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL and (out / "netG_epoch_0.pth").exists(), r.stderr
    assert not (out / "netG_best.pth").exists() and not (out / "checkpoint.pt").exists()
    r = cli(argv)
    assert r.returncode == 0, r.stderr
    assert (out / "netG_best.pth").exists() and (out / "checkpoint.pt").exists()


def test_the_log_line_after_a_resume_is_the_one_an_unstopped_run_writes(tmp_path, monkeypatch):
    """SIGTERM between two log lines: the checkpoint carries the sums since the last line, so the
    next row of losses.csv averages the same iterations as in a run never stopped."""
    argv = ["--dataset", "fake", *TINY, "--log-every", 4, "--score-images", 0, "--max-steps", 12]
    assert run_main(argv + ["--outf", tmp_path / "straight"]) == 0
    log_progress = dcgan.Run.log_progress

    def log_then_signal(run, total):
        log_progress(run, total)
        if run.step == 6:  # between the lines at 4 and 8
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(dcgan.Run, "log_progress", log_then_signal)
    out = tmp_path / "stopped"
    assert run_main(argv + ["--outf", out]) == 128 + signal.SIGTERM
    monkeypatch.setattr(dcgan.Run, "log_progress", log_progress)
    assert run_main(argv[:-1] + ["6", "--outf", out, "--resume"]) == 0

    def losses(folder):  # step, loss_d, loss_g, d_x, d_g_z1, d_g_z2 of every row
        return [r.split(",")[2:8] for r in (folder / "losses.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in losses(out)] == ["4", "8", "12"]
    assert losses(out) == losses(tmp_path / "straight")


def test_a_second_signal_ends_the_process_at_once():
    """Signals within a second of the first count as one (the run saves after its step); one after that, of
    either kind, ends the process where it is."""
    code = (f"import os, signal, sys, time\nsys.path.insert(0, {HERE!r})\nimport dcgan\n"
            "with dcgan.StopSignal() as stop:\n"
            "    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):\n"
            "        os.kill(os.getpid(), s)\n        time.sleep(0.2)\n"
            "    print(stop.signum, flush=True)\n    time.sleep(1)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(10)\n    print('survived')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2"] and r.returncode == -signal.SIGTERM, (r.stdout, r.stderr)


def test_sigkill_during_saves_never_corrupts_and_resume_continues(tmp_path, image_folder):
    """SIGKILL while a large checkpoint is being written (every iteration), at a random point of
    the write; the temporary file left behind proves that the kill landed inside the save:
    the checkpoint on disk always loads, the temporaries are cleaned at the next start, and the
    run finishes with the same weights as one never killed."""
    d = image_folder(120, size=(24, 20))
    big = ["--ngf", 64, "--ndf", 64]  # a checkpoint of about 20 MB: writing it takes most of an iteration
    base = ["--dataset", "folder", "--dataroot", d, "--cache-dir", "", *TINY, *big, "--niter", 20]
    saving = ["--save-every", 1, "--log-every", 1]
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = mid_save = 0
    while kills < 12:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(x) for x in base + saving] +
                             ["--outf", str(out)] + (["--resume"] if kills else []),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        wait_for(p, "Loss_D")  # in the loop: past the start
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.001)  # (the first run: until its first save is whole, so there is one to resume)
        time.sleep(rng.uniform(0.0, 0.2))
        while not any(f.endswith(".tmp") for f in os.listdir(out)) and p.poll() is None and time.time() < deadline:
            time.sleep(0.0005)  # until a save is under way
        time.sleep(rng.uniform(0.0, 0.003))  # at some point of the write
        if p.poll() is not None:
            break
        p.kill()
        p.wait()
        kills += 1
        mid_save += any(f.endswith(".tmp") for f in os.listdir(out))
        ck = state(out / "checkpoint.pt")  # always whole
        assert all(torch.isfinite(t).all() for t in tensors(ck["netG"]).values())
    assert kills == 12 and mid_save >= 8, (kills, mid_save)  # most of them inside a save
    r = cli(base + ["--outf", out, "--resume"])
    assert r.returncode == 0, r.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert run_main(base + ["--outf", tmp_path / "clean"]) == 0
    assert_same_training_state(state(out / "checkpoint.pt"), state(tmp_path / "clean" / "checkpoint.pt"))


def test_weights_holding_nan_are_refused_as_damaged(tmp_path, capsys, dry_run):
    bad = state(dry_run / "netD_epoch_0.pth")
    bad["main.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    out2 = tmp_path / "out2"
    code = run_main(["--dataset", "synthetic", "--netD", tmp_path / "nan.pth", "--outf", out2, "--save-every", 1, *TINY])
    err = capsys.readouterr().err
    assert code == dcgan.EXIT_FILE
    assert "nan.pth is damaged" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out2 / "checkpoint.pt").exists() and not (out2 / "netG_epoch_0.pth").exists()
    # and --generate does not draw NaN images from such a G
    bad = state(dry_run / "netG_epoch_0.pth")
    bad["main.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(bad, tmp_path / "inf.pth")
    assert run_main(["--generate", 4, "--netG", tmp_path / "inf.pth", "--outf", tmp_path / "gen"]) == dcgan.EXIT_FILE
    assert "inf.pth is damaged" in capsys.readouterr().err and not (tmp_path / "gen" / "generated").exists()


def test_divergence_mid_run_stops_with_only_finite_checkpoints(tmp_path, capsys):
    """Two good iterations saved, then a learning rate that makes the next update non-finite: the save after
    it is refused, exit 7, and the checkpoint on disk is the finite one of step 2."""
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--outf", out, *TINY]
    assert run_main(args + ["--max-steps", 2]) == 0
    code = run_main(args + ["--resume", "--lr", 1e30, "--save-every", 1])
    err = capsys.readouterr().err
    assert code == dcgan.EXIT_DIVERGED and "non-finite weights, optimizer state or losses at step 3" in err, err
    assert "last good checkpoint: " + str(out / "checkpoint.pt") in err and err.count("\n") == 1
    ck = state(out / "checkpoint.pt")
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in tensors(ck).values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# The command line: images without training; bad input gets one line, a documented exit code, no traceback,
# and nothing in --outf overwritten
# ------------------------------------------------------------------------------------------------

def test_generate_writes_one_png_per_image_as_g_draws_it(tmp_path, dry_run, short_run):
    out = dry_run
    for weights in (out / "netG_epoch_0.pth", short_run / "checkpoint.pt"):
        gen_out = tmp_path / f"gen-{weights.name}"
        left = gen_out / f".generated.{socket.gethostname()}.tmp"  # by a --generate killed midway
        left.mkdir(parents=True)
        (left / "000000.png").write_bytes(b"half")
        r = cli(["--generate", 300, "--netG", weights, "--outf", gen_out])
        assert r.returncode == 0, r.stderr
        pngs = sorted(os.listdir(gen_out / "generated"))
        assert pngs == [f"{i:06d}.png" for i in range(300)]
        assert sorted(os.listdir(gen_out)) == ["generated", "generated_grid.png"]  # no temporary left
        with Image.open(gen_out / "generated" / pngs[0]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    # each PNG is G's image for the seed's z, rounded as save_image rounds, drawn with the statistics
    # of a whole batch of 256 (also the last, partial one) or, with --sample-bn eval, G's running ones
    r = cli(["--generate", 300, "--netG", out / "netG_epoch_0.pth", "--outf", tmp_path / "gen-eval", "--sample-bn", "eval"])
    assert r.returncode == 0, r.stderr
    G = dcgan.Generator(100, 8, 3, 16)
    G.load_state_dict(state(out / "netG_epoch_0.pth"))
    z = torch.randn(512, 100, 1, 1, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        by_eval = G.eval()(z[:256])
        by_batch = torch.cat([G.train()(z[:256]), G.train()(z[256:])])
    for folder, i, expected in (("gen-netG_epoch_0.pth", 123, by_batch[123]), ("gen-netG_epoch_0.pth", 299, by_batch[299]),
                                ("gen-eval", 123, by_eval[123])):
        got = dcgan.decode_image(tmp_path / folder / "generated" / f"{i:06d}.png", 3).float() / 255 * 2 - 1
        assert (got - expected).abs().max() <= 1 / 255 + 1e-6, (folder, i)
    # a second --generate into the same folder is refused
    r = cli(["--generate", 3, "--netG", out / "netG_epoch_0.pth", "--outf", tmp_path / "gen-netG_epoch_0.pth"])
    assert r.returncode == dcgan.EXIT_OUTPUT and "already holds" in r.stderr


def test_interpolate_writes_seeded_latent_walks(tmp_path, dry_run):
    weights = dry_run / "netG_epoch_0.pth"
    for out in ("a", "b"):
        assert run_main(["--interpolate", 3, "--netG", weights, "--outf", tmp_path / out]) == 0
    png = tmp_path / "a" / "interpolation.png"
    assert png.read_bytes() == (tmp_path / "b" / "interpolation.png").read_bytes()  # seeded
    grid = dcgan.decode_image(png, 3)
    assert grid.shape == (3, 2 + 3 * 18, 2 + 10 * 18)  # 3 rows of 10 images of 16x16, 2-pixel borders
    # each row starts and ends at G of two z that differ from row to row
    rows = [grid[:, 2 + 18 * r:18 + 18 * r, 2:18] for r in range(3)]
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    assert run_main(["--interpolate", 3]) == dcgan.EXIT_USAGE


def test_export_real_writes_what_the_networks_see(tmp_path):
    d = make_numbered_images(tmp_path / "celeba" / "img_align_celeba", 40, size=(178, 218))
    assert run_main(["--dataroot", tmp_path / "celeba", "--export-real", 25, "--imageSize", 32,
                     "--outf", tmp_path / "out", "--workers", 0]) == 0
    pngs = sorted(os.listdir(tmp_path / "out" / "real"))
    assert pngs == [f"{i:06d}.png" for i in range(25)]
    opt = dcgan.parse_args(["--dataroot", str(tmp_path / "celeba"), "--imageSize", "32", "--cache-dir", ""])
    dataset = dcgan.open_dataset(opt)
    seen = {tuple(dataset[i][0][:, 0, 0].tolist()): dataset[i][0] for i in range(40)}
    for name in pngs:
        img = dcgan.decode_image(tmp_path / "out" / "real" / name, 3)
        assert img.shape == (3, 32, 32) and torch.equal(img, seen[tuple(img[:, 0, 0].tolist())])
    assert len({tuple(dcgan.decode_image(tmp_path / "out" / "real" / n, 3)[:, 0, 0].tolist()) for n in pngs}) == 25
    assert d.is_dir()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/dcgan-evil-ran')}",))


def bad_inputs(tmp):
    imgs = make_images(tmp / "imgs", 30, size=(20, 20))
    few = make_images(tmp / "few", 3, size=(20, 20))
    empty = tmp / "empty"
    empty.mkdir()
    (tmp / "textonly").mkdir()
    (tmp / "textonly" / "readme.txt").write_text("no images here")
    (tmp / "a_file").write_text("x")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "notckpt.pt").write_text("hello")
    (tmp / "random.pt").write_bytes(random.Random(1).randbytes(5000))
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    torch.save({"main.0.weight": torch.zeros(3)}, tmp / "wrongshape.pth")
    torch.save({"a": 1}, tmp / "dict.pt")
    run = ["--dataset", "folder", "--dataroot", imgs, "--cache-dir", "", *TINY]
    assert dcgan.main([str(a) for a in run + ["--max-steps", 1, "--outf", tmp / "ck"]]) == 0
    raw = (tmp / "ck" / "checkpoint.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (tmp / "other").mkdir()
    (tmp / "other" / "checkpoint.pt").write_bytes(raw)
    syn = ["--dataset", "synthetic", *TINY]
    E = dcgan
    return [
        (["--dataroot", tmp / "nope", *TINY], E.EXIT_DATA, "nope"),
        (["--dataroot", empty, *TINY], E.EXIT_DATA, "holds no images"),
        (["--dataroot", tmp / "textonly", *TINY], E.EXIT_DATA, "img_align_celeba"),
        (["--dataset", "folder", "--dataroot", tmp / "a_file", *TINY], E.EXIT_DATA, "not a folder"),
        (["--dataset", "folder", *TINY], E.EXIT_USAGE, "--dataroot"),
        (["--dataset", "folder", "--dataroot", few, "--cache-dir", "", *TINY], E.EXIT_DATA, "fewer than one batch"),
        (["--dataset", "cifar10", "--dataroot", empty], E.EXIT_DATA, "cifar10"),
        (["--dataset", "cifar10", "--dataroot", tmp / "new" / "cifar"], E.EXIT_DATA, "check the network"),
        (syn[:2] + ["--imageSize", 48], E.EXIT_USAGE, "--imageSize"),
        (syn + ["--batchSize", 0], E.EXIT_USAGE, "--batchSize"),
        (syn + ["--batchSize", "many"], E.EXIT_USAGE, "--batchSize"),
        (syn + ["--lr", "nan"], E.EXIT_USAGE, "--lr"),
        (syn + ["--lr", -1], E.EXIT_USAGE, "--lr"),
        (syn + ["--amp", "bf16", "--ngpu", 2], E.EXIT_USAGE, "nn.DataParallel"),
        (syn + ["--ema", 1], E.EXIT_USAGE, "--ema"),
        (syn + ["--niter", 0], E.EXIT_USAGE, "--niter"),
        (syn + ["--beta1", 1.5], E.EXIT_USAGE, "--beta1"),
        (syn + ["--workers", -1], E.EXIT_USAGE, "--workers"),
        (syn + ["--nz", 0], E.EXIT_USAGE, "--nz"),
        (syn + ["--dataset", "nope"], E.EXIT_USAGE, "--dataset"),
        (syn + ["--cuda"], E.EXIT_DEVICE, "--cuda"),
        (syn + ["--ngpu", 2], E.EXIT_DEVICE, "--ngpu"),
        (syn + ["--device", "cuda:3"], E.EXIT_DEVICE, "--device cuda:3"),
        (syn + ["--device", "warp9"], E.EXIT_DEVICE, "--device"),
        (syn + ["--amp", "fp16"], E.EXIT_USAGE, "--amp"),
        (syn + ["--outf", tmp / "a_file" / "sub"], E.EXIT_OUTPUT, "--outf"),
        (syn + ["--outf", tmp / "ck"], E.EXIT_OUTPUT, "--resume"),
        (syn + ["--resume", tmp / "missing.pt"], E.EXIT_FILE, "does not exist"),
        (syn + ["--resume", tmp / "empty.pt"], E.EXIT_FILE, "empty.pt cannot be loaded"),
        (syn + ["--resume", tmp / "truncated.pt"], E.EXIT_FILE, "truncated.pt cannot be loaded"),
        (syn + ["--resume", tmp / "notckpt.pt"], E.EXIT_FILE, "notckpt.pt cannot be loaded"),
        (syn + ["--resume", tmp / "random.pt"], E.EXIT_FILE, "random.pt cannot be loaded"),
        (syn + ["--dry-run", "--resume"], E.EXIT_USAGE, "--dry-run"),
        (syn + ["--resume", tmp / "dict.pt"], E.EXIT_FILE, "not a checkpoint"),
        (syn + ["--resume", tmp / "evil.pt"], E.EXIT_FILE, "refused"),
        (run + ["--resume", "--outf", tmp / "other", "--ngf", 16], E.EXIT_FILE, "ngf 8 saved vs 16 now"),
        (run + ["--resume", "--outf", tmp / "other", "--imageSize", 32], E.EXIT_FILE, "imageSize 16 saved vs 32 now"),
        (syn + ["--netG", tmp / "wrongshape.pth"], E.EXIT_FILE, "--netG"),
        (syn + ["--netD", tmp / "evil.pt"], E.EXIT_FILE, "refused"),
        (syn + ["--netG", tmp / "ck" / "netD_epoch_0.pth"], E.EXIT_FILE, "does not fit"),
        (["--generate", 4], E.EXIT_USAGE, "--netG"),
        (syn + ["--generate", 0], E.EXIT_USAGE, "--generate"),  # not a training run
        (syn + ["--export-real", 0], E.EXIT_USAGE, "--export-real"),
        (syn + ["--interpolate", 0], E.EXIT_USAGE, "--interpolate"),
        (["--generate", 4, "--netG", tmp / "dict.pt"], E.EXIT_FILE, "--netG"),
        (["--generate", 4, "--netG", tmp / "evil.pt"], E.EXIT_FILE, "refused"),
    ]


def test_bad_inputs_get_one_line_and_a_code(tmp_path, capsys, monkeypatch):
    mark = tmp_path / "evil-ran"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    cases = bad_inputs(tmp_path)
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    for argv, code, needle in cases:
        try:
            got = dcgan.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            got = e.code
        err = capsys.readouterr().err
        assert got == code, (argv, got, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert needle in err, (argv, err)
    assert not mark.exists(), "a crafted checkpoint ran code"
    assert (tmp_path / "new" / "cifar").is_dir()  # made for the download, as pytorch/examples does
    assert {p: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == snapshot


def test_the_example_command_lines_work_unchanged(tmp_path):
    """pytorch/examples' own CI runs these, again and again in one folder: they pass every time,
    --accel without an accelerator falls back to the CPU, and a dry run leaves nothing that a later
    run would resume from or be refused for."""
    for extra in ([], [], ["--accel"]):
        r = cli(["--dataset", "fake", "--dry-run"] + extra)
        assert r.returncode == 0, r.stderr
        assert "Loss_D" in r.stdout and "Traceback" not in r.stderr
    assert "--accel was given but no accelerator is present; running on the CPU" in r.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    r = cli(["--dataset", "fake", "--resume"])  # nothing to resume: never a silent skip of epoch 0
    assert r.returncode == dcgan.EXIT_FILE and "does not exist" in r.stderr
    assert run_main(["--dataset", "fake", "--max-steps", 1, *TINY]) == 0  # a real run after dry runs
    real = (tmp_path / "out" / "real_samples.png").read_bytes()
    assert real != (tmp_path / "out" / "fake_samples_epoch_000.png").read_bytes()
    r = cli(["--dataset", "fake", "--dry-run", *TINY])  # and a dry run never overwrites that run's files
    assert r.returncode == dcgan.EXIT_OUTPUT and "holds a run" in r.stderr
    assert "N iterations in this run" in " ".join(dcgan.build_parser().format_help().split())  # --max-steps


def test_user_error_on_the_command_line_has_no_traceback(tmp_path):
    r = cli(["--dataroot", tmp_path / "missing", "--outf", tmp_path / "o"])
    assert r.returncode == dcgan.EXIT_DATA
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "missing" in r.stderr
    r = cli(["--batchSize", "x"])
    assert r.returncode == dcgan.EXIT_USAGE and r.stderr.count("\n") == 1

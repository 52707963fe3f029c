"""Tests for dcgan.py. CPU only, tiny models, a few minutes in all: python -m pytest -q"""
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from PIL import Image

import dcgan

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--imageSize", "16", "--ngf", "8", "--ndf", "8", "--batchSize", "16", "--log-every", "4"]


def run_main(argv):
    """dcgan.main in this process; returns its exit code."""
    return dcgan.main([str(a) for a in argv])


def cli(args, **kw):
    """The real command line in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=300, **kw)


def make_images(folder, n, size=(178, 218), seed=0, ext="jpg"):
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", size, colour).save(os.path.join(folder, f"{i:06d}.{ext}"))
    return folder


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
    for key in ("netG", "netD", "optG", "optD"):
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{key}{k} differs"
    assert (a["epoch"], a["iter"], a["step"]) == (b["epoch"], b["iter"], b["step"])


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("nc", [1, 3])
def test_shapes(size, nc):
    G, D = dcgan.Generator(nz=10, ngf=4, nc=nc, image_size=size), dcgan.Discriminator(nc=nc, ndf=4, image_size=size)
    x = G(torch.randn(2, 10, 1, 1))
    assert x.shape == (2, nc, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (2,)
    assert dcgan.generator_shape(G.state_dict()) == (10, 4, nc, size)


def test_unsupported_size_is_refused():
    with pytest.raises(ValueError):
        dcgan.Generator(image_size=48)
    assert run_main(["--dataset", "synthetic", "--imageSize", "48"]) == dcgan.EXIT_USAGE


def test_init_statistics():
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


def test_pytorch_examples_weights_load(tmp_path):
    eg, ed = examples_networks(ngf=16, ndf=16)
    for m in (eg, ed):
        m.apply(dcgan.weights_init)
    torch.save(eg.state_dict(), tmp_path / "netG_epoch_0.pth")
    torch.save(ed.state_dict(), tmp_path / "netD_epoch_0.pth")
    assert list(eg.state_dict())[0] == "main.0.weight"
    G, D = dcgan.Generator(ngf=16), dcgan.Discriminator(ndf=16)
    dcgan.load_weights(G, str(tmp_path / "netG_epoch_0.pth"), "--netG")
    dcgan.load_weights(D, str(tmp_path / "netD_epoch_0.pth"), "--netD")
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


def test_one_training_step_on_fake_data():
    torch.manual_seed(0)
    opt = dcgan.parse_args(["--dataset", "fake", "--ngf", "8", "--ndf", "8", "--imageSize", "16", "--batchSize", "8"])
    G, D = dcgan.Generator(opt.nz, 8, 3, 16), dcgan.Discriminator(3, 8, 16)
    G.apply(dcgan.weights_init)
    D.apply(dcgan.weights_init)
    before = [p.detach().clone() for p in list(G.parameters()) + list(D.parameters())]
    tr = dcgan.Trainer(G, D, opt, torch.device("cpu"), None, False, False, 1)
    real = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    tr.step(real, torch.Generator().manual_seed(0))
    loss_d, loss_g, d_x, d_g_z1, d_g_z2 = tr.read_stats()
    assert all(map(lambda v: v == v and abs(v) < 100, (loss_d, loss_g)))
    assert 0 < d_x < 1 and 0 < d_g_z1 < 1 and 0 < d_g_z2 < 1
    after = list(G.parameters()) + list(D.parameters())
    n_g = len(list(G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before[:n_g], after[:n_g])), "every G tensor must change"
    assert all(not torch.equal(a, b) for a, b in zip(before[n_g:], after[n_g:])), "every D tensor must change"
    assert all(p.requires_grad for p in D.parameters())


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def first_batch(argv):
    opt = dcgan.parse_args(argv + ["--cache-dir", ""])
    data, nc, _ = dcgan.build_dataset(opt)
    if not isinstance(data, torch.Tensor):
        data = dcgan.decode_all(data, 0, lambda *a: None)
    batch = next(dcgan.Batches(data, opt.batchSize, 0, 0, 1, 0, torch.device("cpu")).epoch(0, 0))
    return batch, nc


@pytest.mark.parametrize("layout", ["parent", "itself", "torchvision"])
def test_celeba_layouts(tmp_path, layout):
    folder = {"parent": "img_align_celeba", "itself": "", "torchvision": "celeba/img_align_celeba"}[layout]
    make_images(tmp_path / folder, 10)
    root = tmp_path / ("img_align_celeba" if layout == "itself" else "")
    batch, nc = first_batch(["--dataroot", str(root if layout != "itself" else tmp_path), "--imageSize", "32", "--batchSize", "4"])
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8 and nc == 3


def test_celeba_face_crop():
    # a 178x218 picture whose centre 108x108 square is white and the rest black: the crop keeps only white
    img = torch.zeros(3, 218, 178, dtype=torch.uint8)
    img[:, 55:163, 35:143] = 255
    out = dcgan.image_transform("celeba", 64)(img)
    assert out.shape == (3, 64, 64) and out.min() == 255


@pytest.mark.parametrize("nested", [False, True])
def test_folder_flat_and_nested(tmp_path, nested):
    for c in ("a", "b") if nested else ("",):
        make_images(tmp_path / c, 6 if nested else 12, size=(40, 30), ext="png")
    batch, nc = first_batch(["--dataset", "folder", "--dataroot", str(tmp_path), "--imageSize", "16", "--batchSize", "8"])
    assert batch.shape == (8, 3, 16, 16)


@pytest.mark.parametrize("kind", ["fake", "synthetic"])
def test_builtin_data_sets(kind):
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


def test_odd_images_decode_and_bad_ones_are_skipped(tmp_path, capsys):
    d = tmp_path / "imgs"
    make_images(d, 200, size=(30, 20))
    Image.new("L", (25, 25), 128).save(d / "gray.png")
    Image.new("RGBA", (25, 25), (1, 2, 3, 4)).save(d / "rgba.png")
    Image.new("P", (25, 25)).save(d / "palette.gif")
    Image.new("CMYK", (25, 25), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.new("I;16", (9, 9), 1000).save(d / "deep.png")
    Image.new("RGB", (3, 900), (9, 9, 9)).save(d / "thin.png")
    (d / "broken.jpg").write_bytes(b"not an image at all")
    good = (d / "000000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[:len(good) // 3])
    opt = dcgan.parse_args(["--dataset", "folder", "--dataroot", str(d), "--imageSize", "16", "--cache-dir", ""])
    data, _, _ = dcgan.build_dataset(opt)
    decoded = dcgan.decode_all(data, 0, lambda *a: None)
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skipped" in err
    assert decoded.shape[1:] == (3, 16, 16) and len(decoded) >= 206


def test_too_many_bad_images_stop_the_run(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 20, size=(20, 20))
    for i in range(5):
        (d / f"bad{i}.jpg").write_bytes(b"garbage")
    code = run_main(["--dataset", "folder", "--dataroot", d, "--outf", tmp_path / "out", "--cache-dir", "", *TINY])
    err = capsys.readouterr().err
    assert code == dcgan.EXIT_DATA and "could not be read" in err and "bad0.jpg" in err


def test_decoded_data_set_is_cached_and_invalidated(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 40, size=(20, 20))
    cache = tmp_path / "cache"
    args = ["--dataset", "folder", "--dataroot", d, "--cache-dir", cache, "--dry-run", *TINY]
    assert run_main(args + ["--outf", tmp_path / "a"]) == 0
    files = os.listdir(cache)
    assert len(files) == 1
    assert run_main(args + ["--outf", tmp_path / "b"]) == 0
    assert "from cache" in capsys.readouterr().out
    make_images(d, 41, size=(20, 20), seed=5)  # the source changed: a new cache replaces the old
    assert run_main(args + ["--outf", tmp_path / "c"]) == 0
    assert len(os.listdir(cache)) == 1 and os.listdir(cache) != files
    assert "from cache" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------

def mean_image_distance(G, data, nz):
    torch.manual_seed(0)
    G.eval()
    with torch.no_grad():
        fake = G(torch.randn(256, nz, 1, 1))
    real = data.float() / 127.5 - 1
    return (fake.mean(0) - real.mean(0)).pow(2).mean().item()


def test_short_synthetic_run_learns(tmp_path):
    """G's mean image moves toward the data's mean image (a face on a background); it would not
    if the G step did nothing."""
    out = tmp_path / "run"
    data = dcgan.synthetic_faces(8192, 16, seed=999)
    G0 = dcgan.Generator(100, 64, 3, 16)
    torch.manual_seed(999)
    G0.apply(dcgan.weights_init)
    start = mean_image_distance(G0, data, 100)
    assert run_main(["--dataset", "synthetic", "--imageSize", 16, "--batchSize", 64,
                     "--niter", 3, "--max-steps", 300, "--outf", out, "--log-every", 100]) == 0
    G = dcgan.Generator(100, 64, 3, 16)
    G.load_state_dict(state(out / "checkpoint.pt")["netG"])
    end = mean_image_distance(G, data, 100)
    assert end < 0.35 * start, (start, end)


def test_dry_run_command_line_writes_outputs(tmp_path):
    out = tmp_path / "out"
    r = cli(["--dataset", "fake", "--dry-run", "--outf", out, "--cache-dir", "", *TINY])
    assert r.returncode == 0, r.stderr
    assert "Loss_D" in r.stdout and "img/s" in r.stdout
    names = set(os.listdir(out))
    assert {"real_samples.png", "fake_samples_epoch_000.png", "netG_epoch_0.pth", "netD_epoch_0.pth",
            "checkpoint.pt", "losses.csv"} <= names
    with Image.open(out / "fake_samples_epoch_000.png") as im:
        assert im.size[0] > 16
    g = state(out / "netG_epoch_0.pth")
    assert next(iter(g)) == "main.0.weight" and not any(k.startswith(("module.", "_orig_mod.")) for k in g)
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,iter,step,loss_d,loss_g") and len(rows) == 2


def test_generate_writes_pngs(tmp_path):
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", "--dry-run", "--outf", out, *TINY]) == 0
    for weights in ("netG_epoch_0.pth", "checkpoint.pt"):
        gen_out = tmp_path / f"gen-{weights}"
        r = cli(["--generate", 7, "--netG", out / weights, "--outf", gen_out])
        assert r.returncode == 0, r.stderr
        pngs = sorted(os.listdir(gen_out / "generated"))
        assert len(pngs) == 7 and all(p.endswith(".png") for p in pngs)
        with Image.open(gen_out / "generated" / pngs[0]) as im:
            assert im.size == (16, 16)
        assert (gen_out / "generated_grid.png").exists()


# ------------------------------------------------------------------------------------------------
# Checkpoints, resume, crashes
# ------------------------------------------------------------------------------------------------

def test_checkpoint_holds_the_full_state(tmp_path):
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", "--max-steps", 3, "--outf", out, *TINY]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"format", "netG", "netD", "optG", "optD", "epoch", "iter", "step", "fixed_noise", "config",
            "rng", "history"} <= ck.keys()
    assert (ck["epoch"], ck["iter"], ck["step"]) == (0, 3, 3)
    assert {"python", "torch", "noise"} <= ck["rng"].keys()
    assert ck["config"]["ngf"] == 8 and ck["config"]["nc"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["netG"])
    assert len(ck["optD"]["state"]) == len(list(dcgan.Discriminator(3, 8, 16).parameters()))


def resume_pair(tmp_path, extra, stop):
    """An uninterrupted run and one that is stopped by `stop(args, out)` and resumed."""
    base = ["--cache-dir", "", *TINY, "--niter", 2] + extra
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(base + ["--outf", a]) == 0
    stop(base, b)
    r = cli(base + ["--outf", b, "--resume"])
    assert r.returncode == 0, r.stderr
    ca, cb = state(a / "checkpoint.pt"), state(b / "checkpoint.pt")
    assert_same_training_state(ca, cb)
    # the log continues: every row of the uninterrupted run is there (plus one where it stopped)
    assert set(ca["history"]["step"]) <= set(cb["history"]["step"])
    return a, b


def stop_with_max_steps(n):
    def stop(base, out):
        assert run_main(base + ["--outf", out, "--max-steps", n]) == 0
    return stop


@pytest.mark.parametrize("steps", [5, 12])  # 12 iterations: exactly one epoch of the folder below
def test_resume_is_bitwise_exact(tmp_path, steps):
    d = make_images(tmp_path / "imgs", 200, size=(24, 20))
    resume_pair(tmp_path, ["--dataset", "folder", "--dataroot", d, "--workers", 0], stop_with_max_steps(steps))


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
    raise AssertionError("never printed " + text + ":\n" + "".join(lines) + proc.stderr.read())


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_is_bitwise_exact(tmp_path, workers):
    d = make_images(tmp_path / "imgs", 200, size=(24, 20))

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


def test_sigkill_during_saves_never_corrupts_and_resume_continues(tmp_path):
    """SIGKILL at random moments while a checkpoint is written every iteration: the checkpoint
    on disk always loads, stray temporaries are cleaned at the next start, and the run finishes
    with the same weights as one never killed."""
    d = make_images(tmp_path / "imgs", 120, size=(24, 20))
    base = ["--dataset", "folder", "--dataroot", d, "--cache-dir", "", *TINY, "--niter", 3, "--save-every", 1]
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    first = True
    while kills < 12:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "dcgan.py")] + [str(x) for x in base] +
                             ["--outf", str(out)] + ([] if first else ["--resume"]),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if first:
            wait_for(p, "Loss_D")
        else:
            wait_for(p, "resumed")
        first = False
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is not None:
            break
        p.kill()
        p.wait()
        kills += 1
        ck = state(out / "checkpoint.pt")  # always whole
        assert all(torch.isfinite(t).all() for t in tensors(ck["netG"]).values())
    assert kills >= 10
    r = cli(base + ["--outf", out, "--resume"])
    assert r.returncode == 0, r.stderr
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    assert run_main(base + ["--outf", tmp_path / "clean"]) == 0
    assert_same_training_state(state(out / "checkpoint.pt"), state(tmp_path / "clean" / "checkpoint.pt"))


def test_stray_temporaries_are_cleaned(tmp_path):
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", "--max-steps", 2, "--outf", out, *TINY]) == 0
    (out / ".checkpoint.pt.tmp-12345").write_bytes(b"half a checkpoint")
    assert run_main(["--dataset", "synthetic", "--max-steps", 2, "--outf", out, "--resume", *TINY]) == 0
    assert not (out / ".checkpoint.pt.tmp-12345").exists()


def test_failed_save_is_reported_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", "--max-steps", 2, "--outf", out, *TINY]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code = run_main(["--dataset", "synthetic", "--max-steps", 2, "--outf", out, "--resume", *TINY])
    assert code == dcgan.EXIT_OUTPUT
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_divergence_stops_before_any_save(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(["--dataset", "synthetic", "--dry-run", "--outf", out, *TINY]) == 0
    bad = state(out / "netD_epoch_0.pth")
    bad["main.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    out2 = tmp_path / "out2"
    code = run_main(["--dataset", "synthetic", "--netD", tmp_path / "nan.pth", "--outf", out2, "--save-every", 1, *TINY])
    err = capsys.readouterr().err
    assert code == dcgan.EXIT_DIVERGED
    assert "epoch 0, iteration 0" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out2 / "checkpoint.pt").exists() and not (out2 / "netG_epoch_0.pth").exists()


def test_divergence_mid_run_keeps_checkpoints_finite(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_main(["--dataset", "synthetic", "--lr", 1e12, "--outf", out, "--save-every", 1, *TINY])
    err = capsys.readouterr().err
    assert code == dcgan.EXIT_DIVERGED and "diverged" in err
    if (out / "checkpoint.pt").exists():
        ck = state(out / "checkpoint.pt")
        assert all(torch.isfinite(t).all() for t in tensors(ck).values() if t.is_floating_point())
        assert "last good checkpoint: " + str(out / "checkpoint.pt") in err


# ------------------------------------------------------------------------------------------------
# Bad input: one line, a documented exit code, no traceback, nothing in --outf overwritten
# ------------------------------------------------------------------------------------------------

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
        (syn[:2] + ["--imageSize", 48], E.EXIT_USAGE, "--imageSize"),
        (syn + ["--batchSize", 0], E.EXIT_USAGE, "--batchSize"),
        (syn + ["--batchSize", "many"], E.EXIT_USAGE, "--batchSize"),
        (syn + ["--lr", "nan"], E.EXIT_USAGE, "--lr"),
        (syn + ["--lr", -1], E.EXIT_USAGE, "--lr"),
        (syn + ["--niter", 0], E.EXIT_USAGE, "--niter"),
        (syn + ["--beta1", 1.5], E.EXIT_USAGE, "--beta1"),
        (syn + ["--workers", -1], E.EXIT_USAGE, "--workers"),
        (syn + ["--nz", 0], E.EXIT_USAGE, "--nz"),
        (syn + ["--dataset", "nope"], E.EXIT_USAGE, "--dataset"),
        (syn + ["--cuda"], E.EXIT_DEVICE, "--cuda"),
        (syn + ["--ngpu", 2], E.EXIT_DEVICE, "--ngpu"),
        (syn + ["--device", "cuda:3"], E.EXIT_DEVICE, "--cuda"),
        (syn + ["--device", "warp9"], E.EXIT_DEVICE, "--device"),
        (syn + ["--amp", "fp16"], E.EXIT_USAGE, "--amp"),
        (syn + ["--outf", tmp / "a_file" / "sub"], E.EXIT_OUTPUT, "--outf"),
        (syn + ["--outf", tmp / "ck"], E.EXIT_OUTPUT, "--resume"),
        (syn + ["--resume", tmp / "missing.pt"], E.EXIT_FILE, "does not exist"),
        (syn + ["--resume", tmp / "empty.pt"], E.EXIT_FILE, "empty"),
        (syn + ["--resume", tmp / "truncated.pt"], E.EXIT_FILE, "truncated"),
        (syn + ["--resume", tmp / "notckpt.pt"], E.EXIT_FILE, "not a PyTorch file"),
        (syn + ["--resume", tmp / "dict.pt"], E.EXIT_FILE, "not a checkpoint"),
        (syn + ["--resume", tmp / "evil.pt"], E.EXIT_FILE, "refused"),
        (run + ["--resume", "--outf", tmp / "other", "--ngf", 16], E.EXIT_FILE, "ngf 8 saved vs 16 requested"),
        (run + ["--resume", "--outf", tmp / "other", "--imageSize", 32], E.EXIT_FILE, "imageSize 16 saved vs 32"),
        (syn + ["--netG", tmp / "wrongshape.pth"], E.EXIT_FILE, "--netG"),
        (syn + ["--netD", tmp / "evil.pt"], E.EXIT_FILE, "refused"),
        (syn + ["--netG", tmp / "ck" / "netD_epoch_0.pth"], E.EXIT_FILE, "does not fit"),
        (["--generate", 4], E.EXIT_USAGE, "--netG"),
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
    assert {p: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == snapshot


def test_user_error_on_the_command_line_has_no_traceback(tmp_path):
    r = cli(["--dataroot", tmp_path / "missing", "--outf", tmp_path / "o"])
    assert r.returncode == dcgan.EXIT_DATA
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "missing" in r.stderr
    r = cli(["--batchSize", "x"])
    assert r.returncode == dcgan.EXIT_USAGE and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# Distributed: two gloo processes on the CPU
# ------------------------------------------------------------------------------------------------

def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "dcgan.py"), "--dataset", "synthetic", "--outf", str(out),
                        "--max-steps", "6", "--niter", "1"] + TINY + ["--log-every", "3"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), global batch 32" in r.stdout
    assert "ranks agree: G and D weights identical on 2 processes" in r.stdout
    assert r.stdout.count("Loss_D") == 2  # rank 0 alone logs
    assert state(out / "checkpoint.pt")["step"] == 6

"""Train the project's lung U-Net (``models/lung_net.pt`` of the bundle), reproducibly, on CPU.

    python scripts/train_lung_net.py --out bundles/ct_severity/models [--extra /path/LIDC-IDRI-0002_ct.nii.gz]

Training CT: only chest CT whose terms allow training the shipped model (../shared/DESIGN.md):
LIDC-IDRI-0001 and -0003 (CC BY 3.0), Lung-PET-CT-Dx A0002 (CC BY 4.0), the CIP TestInput volume
(research licence, shipped with the bundle), any ``--extra`` CT of the same terms (the model card
names them: LIDC-IDRI-0002 read from the commit of SOURCES.md §6), plus procedural phantoms. CIP
COPDGene 10002K is left out by default: its CIP whole-lung mask is the independent reference the
lung-mask tests compare with.
The evaluation CT (``chest_ct_00``, ``C3N-00247``, the RICORD COVID-19 series) are never read.

Labels: the threshold lung mask of each clean CT (:func:`~monai_ext.transforms.lung.threshold_lung_mask`)
without the tissue that rises from the abdomen (:func:`~monai_ext.transforms.organs.organ_intrusion`:
liver and spleen domes, heart and diaphragm with their partial-volume rims); the phantoms' exact
lung labels. Inputs: the same CT with ground glass and consolidation inserted inside those labels at
0-90 % of the lung (:func:`~monai_ext.data.lesions.insert_lesions`, several variants per CT), so the
label of a lesion voxel is "lung"; slices from 30 mm below the lung to 30 mm above it; augmented
on the canvas: body size (scale 0.8-1.25), rotation, shift, left-right flip, HU offset and gain,
correlated noise (0-50 HU) and blur. Loss: Dice + binary cross-entropy; AdamW with cosine decay.

Writes ``lung_net.pt`` (state dict) and ``lung_net.json`` (network definition, input settings,
SHA-256, training record with the held-out Dice when ``--holdout`` names a training CT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

def _training_ct() -> tuple[dict, object]:
    """``TRAINING_CT`` and ``shared_data`` of ``scripts/train_default_model.py`` (one list of training CT)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_default_model", Path(__file__).with_name(
        "train_default_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.TRAINING_CT, module.shared_data


TRAINING_CT, shared_data = _training_ct()
#: phantom grids (shape, spacing): several resolutions and slice thicknesses
PHANTOMS = (((224, 224, 60), (1.6, 1.6, 5.0)), ((256, 256, 110), (1.4, 1.4, 2.5)), ((192, 192, 40), (1.9, 1.9, 8.0)))

NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1,
           "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 0}


def clean_volume(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Canonical int16 CT, its lung label (1 right, 2 left; organ domes out), spacing."""
    from monai_ext.data.variants import load_clean_ct

    base = load_clean_ct(path)
    return base.image, base.label, base.spacing


class Case:
    """One anatomy: lesion variants of a canonical CT with the shared lung label."""

    def __init__(self, name: str, variants: list[np.ndarray], label: np.ndarray, spacing: tuple[float, float, float]):
        from monai_ext.transforms.lung_net import body_centre

        self.name, self.variants, self.label, self.spacing = name, variants, label, spacing
        self.centre = body_centre(variants[0], spacing)
        zs = np.flatnonzero(label.any(axis=(0, 1)))
        margin = int(round(30.0 / spacing[2]))
        self.z_range = (max(0, int(zs[0]) - margin), min(label.shape[2] - 1, int(zs[-1]) + margin))
        # the lung bases (from 20 mm below the lowest lung slice to 60 mm above it): organ domes and basal
        # consolidation on the diaphragm, the hardest slices, drawn more often (``--base-share``)
        self.base_range = (max(0, int(zs[0]) - int(round(20.0 / spacing[2]))),
                           min(label.shape[2] - 1, int(zs[0]) + int(round(60.0 / spacing[2]))))
        self.tensors = [torch.from_numpy(v) for v in variants]
        self.label_t = torch.from_numpy((label > 0).astype(np.float32))


#: lesion kinds drawn for the training variants: dense disease (consolidation, mixed with dense cores) is what
#: the threshold mask loses against the chest wall, the heart and the diaphragm, so it is drawn most
KINDS = ("mixed", "mixed", "ggo", "consolidation", "consolidation")


def make_variants(image: np.ndarray, label: np.ndarray, spacing, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from monai_ext.data.lesions import insert_lesions

    out = [image]
    for _ in range(n):
        frac = float(rng.choice([rng.uniform(0.02, 0.3), rng.uniform(0.3, 0.95)]))
        kind = str(rng.choice(KINDS))
        img, _ = insert_lesions(image, label, spacing, frac, seed=int(rng.integers(1 << 30)), kind=kind)
        out.append(img.astype(np.int16))
    return out


def build_cases(names: list[str], extra: list[Path], n_variants: int, n_phantoms: int, seed: int) -> list[Case]:
    from monai_ext.data import synthetic_chest_ct

    rng = np.random.default_rng(seed)
    cases = []
    sources = [(n, shared_data() / TRAINING_CT[n]) for n in names] + [(p.name.split(".")[0], p) for p in extra]
    for name, path in tqdm(sources, desc="training CT", unit="ct"):
        image, label, spacing = clean_volume(path)
        cases.append(Case(name, make_variants(image, label, spacing, n_variants, rng), label, spacing))
    for i in tqdm(range(n_phantoms), desc="phantoms", unit="ct"):
        shape, spacing = PHANTOMS[i % len(PHANTOMS)]
        ct = synthetic_chest_ct(shape, spacing, seed=seed + 500 + i)
        image = np.maximum(ct.image, -1024).astype(np.int16)
        cases.append(Case(f"phantom{i}", make_variants(image, ct.lung, tuple(ct.spacing), 2, rng), ct.lung,
                          tuple(ct.spacing)))
    return cases


def sample_batch(cases: list[Case], cfg, batch: int, rng: np.random.Generator, augment: bool = True,
                 base_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    from monai_ext.transforms.lung_net import canvas_grid, sample_canvas

    xs, ys = [], []
    lo, hi = cfg.window
    for _ in range(batch):
        case = cases[int(rng.integers(len(cases)))]
        vol = case.tensors[int(rng.integers(len(case.tensors)))]
        lo_z, hi_z = case.base_range if rng.random() < base_share else case.z_range
        z = int(rng.integers(lo_z, hi_z + 1))
        if augment:
            scale = float(np.exp(rng.uniform(-0.22, 0.22)))
            grid = canvas_grid(vol.shape[:2], case.spacing, case.centre, cfg, scale=scale,
                               angle=float(rng.uniform(-0.2, 0.2)), shift_mm=tuple(rng.uniform(-25, 25, 2)))
        else:
            grid = canvas_grid(vol.shape[:2], case.spacing, case.centre, cfg)
        x = sample_canvas(vol, [z], case.spacing, case.centre, cfg, grid=grid)[0]
        y = F.grid_sample(case.label_t[:, :, z][None, None], grid, mode="bilinear", align_corners=True)[0]
        if augment:
            width = hi - lo
            gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-40, 40)
            x = (x * width + lo) * gain + offset  # back to HU, scanner gain and offset
            noise = torch.randn_like(x) * float(rng.uniform(0, 50))
            sigma = float(rng.uniform(0, 1.2))
            if sigma > 0.3:
                from monai.transforms import GaussianSmooth

                noise = GaussianSmooth(sigma)(noise) * (1.0 + sigma)
            x = x + noise
            if rng.random() < 0.3:
                from monai.transforms import GaussianSmooth

                x = GaussianSmooth(float(rng.uniform(0.5, 1.2)))(x)
            x = ((x - lo) / width).clamp(0, 1)
            if rng.random() < 0.5:  # left-right flip of the canvas
                x, y = x.flip(1), y.flip(1)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), (torch.stack(ys) > 0.5).float()


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    inter = np.count_nonzero(pred & ref)
    return 2.0 * inter / max(1, np.count_nonzero(pred) + np.count_nonzero(ref))


def main(argv: list[str] | None = None) -> int:
    from monai_ext.transforms.lung_net import LungNetInput

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bundles" / "ct_severity" / "models"),
                   help="folder for lung_net.pt and lung_net.json")
    p.add_argument("--extra", nargs="*", default=[], help="more training CT files of allowed terms")
    p.add_argument("--holdout", default=None, help="a training CT name to leave out and report Dice on")
    p.add_argument("--exclude", nargs="*", default=["CIP-10002K"],
                   help="training CT left out (default CIP-10002K: its CIP reference lung mask then gives an "
                        "independent Dice)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--variants", type=int, default=5, help="lesion variants per training CT")
    p.add_argument("--phantoms", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", type=int, default=LungNetInput.size, help="canvas size in pixels")
    p.add_argument("--pixel-mm", type=float, default=LungNetInput.pixel_mm, help="canvas pixel size in mm")
    p.add_argument("--channels", type=int, nargs="+", default=NETWORK["channels"],
                   help="U-Net channels per level (one stride-2 level fewer than channels)")
    p.add_argument("--base-share", type=float, default=0.3,
                   help="share of training slices drawn from the lung bases (organ domes, basal lesions)")
    args = p.parse_args(argv)

    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    if args.threads:
        torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = LungNetInput(size=args.size, pixel_mm=args.pixel_mm)
    network = dict(NETWORK, channels=list(args.channels), strides=[2] * (len(args.channels) - 1))
    names = [n for n in TRAINING_CT if n != args.holdout and n not in args.exclude]
    extra = [Path(e) for e in args.extra if Path(e).name.split(".")[0] != args.holdout]
    t0 = time.time()
    cases = build_cases(names, extra, args.variants, args.phantoms, args.seed)
    print(f"{len(cases)} cases prepared in {time.time() - t0:.0f} s")

    net = ConfigParser({"net": dict(network)}).get_parsed_content("net")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    loss_fn = DiceCELoss(sigmoid=True)
    net.train()
    t0 = time.time()
    losses = []
    for step in (bar := tqdm(range(args.steps), desc="training", unit="step")):
        x, y = sample_batch(cases, cfg, args.batch, rng, base_share=args.base_share)
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    train_s = time.time() - t0
    net.eval()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "lung_net.pt"
    torch.save(net.state_dict(), weights)
    from pipelines.bundle import sha256_file

    record = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "variants": args.variants,
              "phantoms": args.phantoms, "seed": args.seed, "base_share": args.base_share,
              "kinds": list(KINDS), "training_ct": names + [p.name for p in extra],
              "train_seconds": round(train_s), "final_loss": round(float(np.mean(losses[-100:])), 4)}
    if args.holdout:
        from monai_ext.transforms.lung_net import LungNet, lung_probability

        image, label, spacing = clean_volume(shared_data() / TRAINING_CT[args.holdout])
        prob = lung_probability(image, spacing, LungNet(net, cfg, {}, weights))
        record["holdout"] = {"name": args.holdout, "dice": round(dice(prob > 0.5, label > 0), 4)}
        np.savez_compressed(out / f"holdout_{args.holdout}.npz", ct=image, label=label, pred=(prob > 0.5),
                            spacing=np.asarray(spacing))
    info = {"format": "ct-severity-lung-net/1", "network_def": network, "input": cfg.to_dict(),
            "sha256": sha256_file(weights), "training": record}
    (out / "lung_net.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

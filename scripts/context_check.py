"""Does the classifier score a study from its lungs or from the tissue around them?

    python scripts/context_check.py STUDY [STUDY ...] [--bundle B] [--margin-mm 4] [--lung-mask threshold]

For each study, the slice classifier scores every lung slice three times: as it is; with the body
beyond ``--margin-mm`` of the lung replaced by soft tissue (40 HU: abdomen, neck and chest wall
become uniform, the air around the body stays); and with everything beyond that margin replaced
by soft tissue. A model that reads lesions from the lungs gives about the same scores; a model
whose scores drop when the surroundings are flattened has taken something outside the lung for
lesion (the model card reports this for the embedded model on real chest CT). The three inputs are
made here, whatever the model's own ``flatten_beyond_mm`` (the second is what that setting gives).
Prints a table of the slices scored above ``--show`` in any variant, and the study probabilities.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from monai_ext.transforms.slices import flatten_surroundings

VARIANTS = ("as_is", "body_flattened", "all_flattened")


def context_variants(hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float], margin_mm: float = 4.0
                     ) -> dict[str, np.ndarray]:
    """The three versions of a (X, Y, Z) HU volume: as is, the body beyond ``margin_mm`` (in-plane)
    of the lung set to soft tissue, and everything beyond the margin set to soft tissue."""
    return {"as_is": hu,
            "body_flattened": flatten_surroundings(hu, lung, spacing, margin_mm).numpy(),
            "all_flattened": flatten_surroundings(hu, lung, spacing, margin_mm, keep_air=False).numpy()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+")
    p.add_argument("--bundle", default=None, help="bundle folder (default: the embedded one)")
    p.add_argument("--margin-mm", type=float, default=4.0, help="lung surroundings kept as they are (mm, in-plane)")
    p.add_argument("--lung-mask", default="threshold", choices=LUNG_BACKENDS)
    p.add_argument("--show", type=float, default=0.5, help="list slices scored above this in any variant")
    args = p.parse_args(argv)

    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask
    from monai_ext.transforms.slices import extract_slices
    from pipelines.bundle import load_model, predict_slices, study_probability

    model = load_model(args.bundle)
    for path in args.studies:
        ct = load_ct(path)
        lung = LungMask(backend=args.lung_mask)(ct)
        spacing = ct.pixdim.tolist()
        hu = ct[0].numpy()
        probs, stack = {}, None
        for name, vol in context_variants(hu, lung[0].numpy(), spacing, args.margin_mm).items():
            kwargs = dict(model.slice_kwargs, flatten_beyond_mm=None)  # the variants are made above
            stack = extract_slices(torch.from_numpy(np.ascontiguousarray(vol))[None], lung, spacing, **kwargs)
            probs[name] = predict_slices(model.network, stack.images, device=model.device).numpy()
        area = stack.lung_area.numpy().astype(float)
        share = area / max(area.max(), 1.0)
        print(f"\n{path}  (margin {args.margin_mm:g} mm)")
        print(f"{'slice':>5s} {'lung share':>10s} " + " ".join(f"{v:>15s}" for v in VARIANTS))
        for i, z in enumerate(stack.indices.tolist()):
            if max(probs[v][i] for v in VARIANTS) > args.show:
                print(f"{z:5d} {share[i]:10.2f} " + " ".join(f"{probs[v][i]:15.3f}" for v in VARIANTS))
        print(f"{'study':>16s} " + " ".join(f"{study_probability(probs[v]):15.3f}" for v in VARIANTS))
        print(f"{'slices > 0.5':>16s} " + " ".join(f"{int((probs[v] > 0.5).sum()):15d}" for v in VARIANTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

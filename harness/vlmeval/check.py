"""``python -m harness.vlmeval.check``: VLMEvalKit's environment can do what the harness asks of it.

Run by ``make vlmeval-install`` after the install: the VLMEvalKit pieces the harness uses import
(its model base class, its inference job, its dataset builder and the yes/no and multiple-choice
datasets), and Hydra still composes a run's config next to them (VLMEvalKit declares an omegaconf
that Hydra 1.3 cannot use; the environment keeps Hydra's). One line and exit 1 on failure.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from harness.vlmeval import import_vlmeval

        import_vlmeval()
        from vlmeval.dataset import build_dataset  # noqa: F401
        from vlmeval.dataset.image_mcq import CustomMCQDataset  # noqa: F401
        from vlmeval.dataset.image_yorn import ImageYORNDataset  # noqa: F401
        from vlmeval.inference import infer_data_job  # noqa: F401
        from vlmeval.vlm.base import BaseModel  # noqa: F401

        from harness.config import compose

        compose(["model=llava_tiny", "method=lazy", "task=vlmeval"])
    except Exception as err:  # any failure: one line naming it
        print(f"error: VLMEvalKit's environment is incomplete: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    import vlmeval

    print(f"VLMEvalKit {getattr(vlmeval, '__version__', '?')} imports; Hydra composes beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())

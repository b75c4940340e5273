"""``python -m harness +exp=NAME key=value ...``: one experiment; prints the result path last."""

import sys

import hydra
from omegaconf import DictConfig

from harness.run import RunError, run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        path = run(cfg)
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()

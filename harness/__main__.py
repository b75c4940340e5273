"""``python -m harness +exp=NAME key=value ...``: one experiment; prints the result path last."""

import sys

if __name__ == "__main__":  # task=vlmeval from a Python without VLMEvalKit: the same command in .venv-vlmeval,
    from harness.vlmeval import reexec  # before this process loads torch and Hydra

    reexec(sys.argv[1:])

import hydra
from omegaconf import DictConfig

from harness.command_line import check_command_line
from harness.config import CONF_DIR, register_method_presets
from harness.folders import clean_refused, in_multirun, output_dir
from harness.settings import RunError
from harness.results import SampleLog
from harness.run import preflight, run


# an absolute path: Hydra reads a relative one against the file when run as a script but as a module path
# when this module is imported (the tests call main() in process)
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        path = run(cfg)
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        try:
            clean_refused(output_dir(cfg))  # no .hydra/ or empty log left behind by a refused run
        except (RunError, OSError):
            pass
        sys.exit(2)
    except KeyboardInterrupt:
        out_dir = output_dir(cfg)
        kept = SampleLog(out_dir, "").count()
        if in_multirun():  # the same command: its finished points are skipped, this one resumes
            how = "re-run the same command to resume the sweep (finished points are skipped, this one resumes)"
        elif cfg.get("out_dir"):
            how = "re-run the same command (same out_dir) to resume"
        else:  # the default out_dir carries a time stamp: the same command would start afresh
            how = f"re-run the same command with out_dir={out_dir} to resume"
        print(f"\ninterrupted: {kept} finished sample(s) kept in {out_dir}; {how}.", file=sys.stderr)
        sys.exit(130)
    print(path)


def precheck() -> None:
    """What runs before Hydra: presets for registered methods without a conf/method YAML
    (lazyattn.register), then the command line's check (a refusal: one line, exit status 2)."""
    register_method_presets()
    check_command_line(preflight=preflight)


if __name__ == "__main__":
    precheck()
    main()

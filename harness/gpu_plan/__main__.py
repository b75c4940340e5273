import sys

from harness.gpu_plan.cli import main

sys.exit(main())

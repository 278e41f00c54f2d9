"""`python -m oss_mlx.cli`: the same as the `oss-mlx` command."""

import sys

from oss_mlx.cli import main

sys.exit(main())

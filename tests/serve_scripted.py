"""`oss-mlx serve` on a ScriptedModel: the real command, a scripted engine (for agent CLIs).

    python tests/serve_scripted.py --port 12000 --name scripted-oss \
        --reply '<|channel|>analysis<|message|>...<|end|>...' --reply '...'

Each --reply is one harmony token stream (see scripted.py), served to the requests in order.
Used to record real client traffic (tests/traffic/) and to run a live Codex session.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedModel, vocab_dir  # noqa: E402

from oss_mlx import server  # noqa: E402
from oss_mlx.engine import Engine  # noqa: E402
from oss_mlx.harmony import load_encoding  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    server.add_arguments(parser)
    parser.add_argument("--reply", action="append", default=[], help="a scripted reply")
    args = parser.parse_args(argv)
    args.model = str(vocab_dir(Path(tempfile.mkdtemp(prefix="oss-mlx-scripted-"))))
    args.name = args.name or "scripted-oss"

    def engine(folder: str) -> Engine:
        encoding = load_encoding(folder)
        return Engine(ScriptedModel(*args.reply, encoding=encoding, max_context=131072),
                      encoding)

    return server.main(args, engine_factory=engine)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point for ``paddle-llm selftest`` under Paddle's launcher, which starts ``python -u SCRIPT`` (no ``-m``):

    python -m paddle.distributed.launch --nproc_per_node 2 selftest.py [the planned run's flags] --device cpu
    python -m paddle.distributed.launch --gpus 0,1 selftest.py [the planned run's flags]
"""

import sys

from paddle_llm.console import configure_output

if __name__ == "__main__":
    configure_output()  # before the selftest imports Paddle, whose C++ logging reads its level as it loads
    from paddle_llm.tools.selftest import main

    sys.exit(main())

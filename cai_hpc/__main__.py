import sys

from cai_hpc.cli import main

sys.exit(main())

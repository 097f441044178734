import sys

from dp2osr.cli import main

sys.exit(main())

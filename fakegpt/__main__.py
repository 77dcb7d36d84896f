import sys

from fakegpt.cli import main

sys.exit(main())

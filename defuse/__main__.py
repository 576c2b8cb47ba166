import sys

from defuse.cli import main

sys.exit(main())

import sys

from spotd.cli import main

sys.exit(main())

import sys

from spotd.cli.main import main

sys.exit(main())

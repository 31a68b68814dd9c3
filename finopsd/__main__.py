import sys

from finopsd.cli import main

sys.exit(main())

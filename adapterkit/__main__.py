import sys

from adapterkit.cli import main

sys.exit(main())

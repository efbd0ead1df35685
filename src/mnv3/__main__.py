import sys

from mnv3.cli import main

sys.exit(main())

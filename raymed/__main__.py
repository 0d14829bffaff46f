import sys

from raymed.cli import main

sys.exit(main())

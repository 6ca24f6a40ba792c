import sys

from esdwatch.cli.main import main

sys.exit(main())

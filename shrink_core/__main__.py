import sys

from shrink_core.cli.entry import main

sys.exit(main())

import sys

from campaignd.cli import main

sys.exit(main())

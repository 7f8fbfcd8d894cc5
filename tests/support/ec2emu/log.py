"""One line per notable event, on stderr."""

import sys
import time


def log(msg):
    sys.stderr.write("%s ec2_emulator: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()

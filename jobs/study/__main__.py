"""``python -m jobs.study ...`` forwards to ``python -m study ...`` for one release (the study moved out of jobs).

It forwards at run time, by replacing this process, because jobs may not import the study package above it.
"""

import os
import sys

if __name__ == "__main__":
    print("jobs.study: moved to `python -m study`; forwarding (this alias goes in the next release)", file=sys.stderr)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "study", *sys.argv[1:]])

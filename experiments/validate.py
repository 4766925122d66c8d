"""Run the calibration cases (docs/fidelity.md): predicted vs published, with the error.

    python experiments/validate.py                       # every case; data at the small sizes
    python experiments/validate.py fft3d --execute none  # the FFT cases from shapes alone
    python experiments/validate.py --tolerance 0.5       # exit 0 when every case is within 50 %

Same as `wafer validate`; the library code is wafer/validation/.
"""

import sys

from wafer.validation import main

if __name__ == "__main__":
    sys.exit(main())

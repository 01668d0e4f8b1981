"""Legacy entry point: python train_fastai.py --experiment <name> --data_dir <dir>"""
import sys

from cxrmem.experiment import legacy_main

if __name__ == "__main__":
    sys.exit(legacy_main())

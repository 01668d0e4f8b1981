"""Train, evaluate or check data for one experiment: python train.py --config configs/experiments/<name>.yaml"""
import sys

from cxrmem.experiment import train_main

if __name__ == "__main__":
    sys.exit(train_main())

"""
evaluate.py -- the paper's evaluation protocol (METHOD.md section 7): IS, IC-LPIPS, ResNet34
classification and UNet localization trained on synthesized anomalies.

Not built yet: this stage arrives with issue #5.
"""
import sys

if __name__ == "__main__":
    sys.exit("evaluate.py is not built yet (issue #5); synthesize.py writes the layout it will read")

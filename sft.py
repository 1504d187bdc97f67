"""
sft.py -- supervised fine-tuning of the policy on structured trajectories (METHOD.md section 5).

Not built yet: this stage arrives with issue #3 (structured trajectories and SFT).
"""
import sys

if __name__ == "__main__":
    sys.exit("sft.py is not built yet (issue #3); synthesize.py runs the expert agent today")
